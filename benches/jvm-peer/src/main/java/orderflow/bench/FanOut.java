package orderflow.bench;

import com.fasterxml.jackson.databind.JsonNode;
import com.fasterxml.jackson.databind.ObjectMapper;
import java.io.IOException;
import java.lang.management.ManagementFactory;
import java.net.URI;
import java.net.http.HttpClient;
import java.net.http.HttpRequest;
import java.net.http.HttpResponse;
import java.nio.ByteBuffer;
import java.nio.file.Files;
import java.nio.file.Path;
import java.time.Duration;
import java.util.ArrayList;
import java.util.Collection;
import java.util.HashMap;
import java.util.List;
import java.util.Locale;
import java.util.Map;
import java.util.Optional;
import java.util.Properties;
import java.util.concurrent.ExecutionException;
import java.util.concurrent.atomic.AtomicReference;
import org.apache.avro.Schema;
import org.apache.avro.generic.GenericDatumReader;
import org.apache.avro.generic.GenericRecord;
import org.apache.avro.io.BinaryDecoder;
import org.apache.avro.io.DecoderFactory;
import org.apache.kafka.clients.admin.Admin;
import org.apache.kafka.clients.admin.AdminClientConfig;
import org.apache.kafka.clients.admin.NewTopic;
import org.apache.kafka.clients.consumer.ConsumerConfig;
import org.apache.kafka.clients.consumer.ConsumerRecord;
import org.apache.kafka.clients.consumer.ConsumerRecords;
import org.apache.kafka.clients.consumer.KafkaConsumer;
import org.apache.kafka.clients.producer.KafkaProducer;
import org.apache.kafka.clients.producer.ProducerConfig;
import org.apache.kafka.clients.producer.ProducerRecord;
import org.apache.kafka.common.errors.TopicExistsException;
import org.apache.kafka.common.serialization.ByteArrayDeserializer;
import org.apache.kafka.common.serialization.ByteArraySerializer;

/**
 * The JVM peer of benches/fanout.rs, written plainly with kafka-clients and Avro's generic API:
 * consume order.created events (Confluent wire format), decode and validate each against its
 * writer schema from the registry, copy the original record to four topics, and commit a poll
 * batch's offsets only once all of its sends are acknowledged (at-least-once).
 *
 * <p>Stops after the expected number of events and prints one JSON line to stdout:
 * events, seconds and events_per_second (from the first event processed to the commit covering
 * the last one), cpu_seconds (the whole process lifetime, JVM start-up and JIT included) and
 * cpu_seconds_first_to_last (the measured window only, like fanout.rs), both also per million
 * events, rss_mib (VmRSS at the end) and rss_max_mib (VmHWM, the peak), and
 * start_to_first_event_seconds (JVM start to the first event processed).
 *
 * <p>"Processed" means decoded, validated and its four sends handed to the producer.
 *
 * <pre>
 * FanOut --input TOPIC --events N [--bootstrap HOST:PORT] [--registry URL]
 *        [--outputs T1,T2,T3,T4 | --output-prefix P] [--group ID] [--timeout-seconds S]
 * </pre>
 *
 * Defaults: ORDERFLOW_BOOTSTRAP_SERVERS / ORDERFLOW_REGISTRY_URL or the local stack's addresses;
 * outputs P{a,b,c,d}.orders with P = "INPUT."; a fresh group id per run (so it always starts
 * from the beginning of the input); a 600 s time limit.
 */
public final class FanOut {

  public static void main(String[] argv) throws Exception {
    Map<String, String> args = parseArgs(argv);
    String bootstrap =
        args.getOrDefault("bootstrap", env("ORDERFLOW_BOOTSTRAP_SERVERS", "127.0.0.1:19092"));
    String registry =
        args.getOrDefault(
            "registry", env("ORDERFLOW_REGISTRY_URL", "http://127.0.0.1:18081/apis/ccompat/v7"));
    String input = required(args, "input");
    long expected = Long.parseLong(required(args, "events"));
    String prefix = args.getOrDefault("output-prefix", input + ".");
    List<String> outputs =
        args.containsKey("outputs")
            ? List.of(args.get("outputs").split(","))
            : List.of(prefix + "a.orders", prefix + "b.orders", prefix + "c.orders", prefix + "d.orders");
    String group = args.getOrDefault("group", "orderflow-jvm-peer-" + System.currentTimeMillis());
    long deadline = System.nanoTime() + Long.parseLong(args.getOrDefault("timeout-seconds", "600")) * 1_000_000_000L;

    createTopics(bootstrap, outputs);
    SchemaCache schemas = new SchemaCache(registry);

    Properties consumerProps = new Properties();
    consumerProps.put(ConsumerConfig.BOOTSTRAP_SERVERS_CONFIG, bootstrap);
    consumerProps.put(ConsumerConfig.GROUP_ID_CONFIG, group);
    // Values stay bytes: we decode them ourselves and forward the original bytes unchanged.
    consumerProps.put(ConsumerConfig.KEY_DESERIALIZER_CLASS_CONFIG, ByteArrayDeserializer.class);
    consumerProps.put(ConsumerConfig.VALUE_DESERIALIZER_CLASS_CONFIG, ByteArrayDeserializer.class);
    // We commit ourselves, after the outputs are acknowledged (at-least-once).
    consumerProps.put(ConsumerConfig.ENABLE_AUTO_COMMIT_CONFIG, false);
    // A new group starts at the beginning of the input, so the pre-published events are read.
    consumerProps.put(ConsumerConfig.AUTO_OFFSET_RESET_CONFIG, "earliest");
    // Skip records of aborted transactions, like orderflow's processors.
    consumerProps.put(ConsumerConfig.ISOLATION_LEVEL_CONFIG, "read_committed");

    Properties producerProps = new Properties();
    producerProps.put(ProducerConfig.BOOTSTRAP_SERVERS_CONFIG, bootstrap);
    producerProps.put(ProducerConfig.KEY_SERIALIZER_CLASS_CONFIG, ByteArraySerializer.class);
    producerProps.put(ProducerConfig.VALUE_SERIALIZER_CLASS_CONFIG, ByteArraySerializer.class);
    // Acknowledged only once every in-sync replica has the record.
    producerProps.put(ProducerConfig.ACKS_CONFIG, "all");
    // Broker-side dedup of the producer's own retries; keeps per-partition order.
    producerProps.put(ProducerConfig.ENABLE_IDEMPOTENCE_CONFIG, true);
    // A 1 ms batching window and lz4, as orderflow's processors configure their producer.
    producerProps.put(ProducerConfig.LINGER_MS_CONFIG, 1);
    producerProps.put(ProducerConfig.COMPRESSION_TYPE_CONFIG, "lz4");

    long processed = 0;
    long invalid = 0;
    long firstNanos = 0;
    long firstEpochMillis = 0;
    double firstCpu = 0;
    AtomicReference<Exception> sendError = new AtomicReference<>();
    BinaryDecoder decoder = null; // reused across records

    try (KafkaConsumer<byte[], byte[]> consumer = new KafkaConsumer<>(consumerProps);
        KafkaProducer<byte[], byte[]> producer = new KafkaProducer<>(producerProps)) {
      consumer.subscribe(List.of(input));
      while (processed < expected) {
        if (System.nanoTime() > deadline) {
          throw new IllegalStateException(
              "time limit reached after " + processed + " of " + expected + " events from " + input);
        }
        ConsumerRecords<byte[], byte[]> batch = consumer.poll(Duration.ofMillis(100));
        if (batch.isEmpty()) continue;
        for (ConsumerRecord<byte[], byte[]> record : batch) {
          byte[] value = record.value();
          boolean valid;
          try {
            // Confluent wire format: magic byte 0, 4-byte big-endian schema id, Avro binary.
            if (value == null || value.length < 5 || value[0] != 0) {
              valid = false;
            } else {
              int schemaId = ByteBuffer.wrap(value, 1, 4).getInt();
              GenericDatumReader<GenericRecord> reader = schemas.reader(schemaId);
              decoder = DecoderFactory.get().binaryDecoder(value, 5, value.length - 5, decoder);
              valid = isValidOrder(reader.read(null, decoder));
            }
          } catch (IOException | RuntimeException e) { // truncated or corrupt Avro
            valid = false;
          }
          if (valid) {
            // The original key, value and headers, unchanged, to each output.
            for (String output : outputs) {
              producer.send(
                  new ProducerRecord<>(output, null, record.key(), value, record.headers()),
                  (metadata, error) -> {
                    if (error != null) sendError.compareAndSet(null, error);
                  });
            }
          } else {
            invalid++; // orderflow would dead-letter it; here it is only counted
          }
          if (processed++ == 0) {
            firstNanos = System.nanoTime();
            firstEpochMillis = System.currentTimeMillis();
            firstCpu = cpuSeconds();
          }
        }
        // At-least-once: every send of the batch acknowledged, then its offsets committed.
        producer.flush();
        if (sendError.get() != null) throw new IllegalStateException("send failed", sendError.get());
        consumer.commitSync();
      }
      long lastNanos = System.nanoTime();
      double cpuWindow = cpuSeconds() - firstCpu;
      report(processed, invalid, firstNanos, lastNanos, firstEpochMillis, cpuWindow);
    }
  }

  // --- validation -------------------------------------------------------------------------------

  /** A little of what the Rust side checks: ids present, at least one item. */
  static boolean isValidOrder(GenericRecord order) {
    GenericRecord envelope = (GenericRecord) order.get("envelope");
    GenericRecord data = (GenericRecord) order.get("data");
    if (envelope == null || data == null) return false;
    if (envelope.get("event_id") == null || data.get("order_id") == null) return false;
    Object items = data.get("items");
    return items instanceof Collection<?> c && !c.isEmpty();
  }

  // --- schema registry --------------------------------------------------------------------------

  /** Writer schemas fetched by id from a Confluent-compatible registry, once each. */
  static final class SchemaCache {
    private final String base;
    private final HttpClient http = HttpClient.newHttpClient();
    private final ObjectMapper json = new ObjectMapper(); // Jackson comes with Avro
    private final Map<Integer, GenericDatumReader<GenericRecord>> readers = new HashMap<>();

    SchemaCache(String registryUrl) {
      this.base = registryUrl.replaceAll("/+$", "");
    }

    GenericDatumReader<GenericRecord> reader(int id) throws IOException {
      GenericDatumReader<GenericRecord> reader = readers.get(id);
      if (reader == null) {
        reader = new GenericDatumReader<>(fetch(id));
        readers.put(id, reader);
      }
      return reader;
    }

    private Schema fetch(int id) throws IOException {
      HttpRequest request =
          HttpRequest.newBuilder(URI.create(base + "/schemas/ids/" + id))
              .header("Accept", "application/vnd.schemaregistry.v1+json")
              .timeout(Duration.ofSeconds(10))
              .build();
      HttpResponse<String> response;
      try {
        response = http.send(request, HttpResponse.BodyHandlers.ofString());
      } catch (InterruptedException e) {
        Thread.currentThread().interrupt();
        throw new IOException(e);
      }
      if (response.statusCode() != 200) {
        // Not a bad record but a broken set-up: stop the run instead of counting it invalid.
        throw new IllegalStateException(
            "GET " + request.uri() + " answered " + response.statusCode() + ": " + response.body());
      }
      JsonNode body = json.readTree(response.body());
      // orderflow registers self-contained schemas (no references), so the text parses alone.
      return new Schema.Parser().parse(body.get("schema").asText());
    }
  }

  // --- set-up -----------------------------------------------------------------------------------

  /** Creates the outputs up front (broker's default partitions and replicas) if missing. */
  static void createTopics(String bootstrap, List<String> topics) throws Exception {
    try (Admin admin = Admin.create(Map.of(AdminClientConfig.BOOTSTRAP_SERVERS_CONFIG, bootstrap))) {
      List<NewTopic> wanted = new ArrayList<>();
      for (String t : topics) wanted.add(new NewTopic(t, Optional.empty(), Optional.empty()));
      for (var result : admin.createTopics(wanted).values().values()) {
        try {
          result.get();
        } catch (ExecutionException e) {
          if (!(e.getCause() instanceof TopicExistsException)) throw e;
        }
      }
    }
  }

  // --- measurements -----------------------------------------------------------------------------

  /** Process CPU seconds (user + system, all threads) so far. */
  static double cpuSeconds() {
    var os = (com.sun.management.OperatingSystemMXBean) ManagementFactory.getOperatingSystemMXBean();
    return os.getProcessCpuTime() / 1e9;
  }

  /** Reads a "VmRSS:   1234 kB" line of /proc/self/status, in MiB (-1 where unavailable). */
  static double procStatusMiB(String field) {
    try {
      for (String line : Files.readAllLines(Path.of("/proc/self/status"))) {
        if (line.startsWith(field + ":")) {
          return Long.parseLong(line.replaceAll("[^0-9]", "")) / 1024.0;
        }
      }
    } catch (IOException | NumberFormatException e) {
      // not Linux: leave it out
    }
    return -1;
  }

  static void report(
      long events, long invalid, long firstNanos, long lastNanos, long firstEpochMillis, double cpuWindow) {
    double seconds = (lastNanos - firstNanos) / 1e9;
    double cpu = cpuSeconds();
    long jvmStart = ManagementFactory.getRuntimeMXBean().getStartTime();
    System.out.println(
        String.format(
            Locale.ROOT,
            "{\"events\":%d,\"invalid\":%d,\"seconds\":%.3f,\"events_per_second\":%.0f,"
                + "\"cpu_seconds\":%.3f,\"cpu_seconds_per_million\":%.1f,"
                + "\"cpu_seconds_first_to_last\":%.3f,\"cpu_seconds_first_to_last_per_million\":%.1f,"
                + "\"rss_mib\":%.1f,\"rss_max_mib\":%.1f,\"start_to_first_event_seconds\":%.3f}",
            events,
            invalid,
            seconds,
            seconds > 0 ? events / seconds : 0,
            cpu,
            cpu / events * 1e6,
            cpuWindow,
            cpuWindow / events * 1e6,
            procStatusMiB("VmRSS"),
            procStatusMiB("VmHWM"),
            (firstEpochMillis - jvmStart) / 1e3));
  }

  // --- arguments --------------------------------------------------------------------------------

  static Map<String, String> parseArgs(String[] argv) {
    Map<String, String> args = new HashMap<>();
    for (int i = 0; i < argv.length; i++) {
      if (argv[i].equals("-h") || argv[i].equals("--help")) usage(0, null);
      if (!argv[i].startsWith("--") || i + 1 >= argv.length) usage(2, "bad argument: " + argv[i]);
      args.put(argv[i].substring(2), argv[++i]);
    }
    return args;
  }

  static String required(Map<String, String> args, String name) {
    String v = args.get(name);
    if (v == null) usage(2, "missing --" + name);
    return v;
  }

  static String env(String name, String fallback) {
    String v = System.getenv(name);
    return v == null || v.isEmpty() ? fallback : v;
  }

  static void usage(int code, String error) {
    if (error != null) System.err.println("FanOut: " + error);
    System.err.println(
        "usage: FanOut --input TOPIC --events N [--bootstrap HOST:PORT] [--registry URL]\n"
            + "              [--outputs T1,T2,T3,T4 | --output-prefix P] [--group ID] [--timeout-seconds S]");
    System.exit(code);
  }
}
