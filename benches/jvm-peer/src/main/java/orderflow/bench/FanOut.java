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
import java.util.ArrayDeque;
import java.util.ArrayList;
import java.util.HashMap;
import java.util.List;
import java.util.Locale;
import java.util.Map;
import java.util.Optional;
import java.util.Properties;
import java.util.UUID;
import java.util.concurrent.ExecutionException;
import java.util.concurrent.atomic.AtomicInteger;
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
import org.apache.kafka.clients.consumer.OffsetAndMetadata;
import org.apache.kafka.clients.producer.KafkaProducer;
import org.apache.kafka.clients.producer.ProducerConfig;
import org.apache.kafka.clients.producer.ProducerRecord;
import org.apache.kafka.common.TopicPartition;
import org.apache.kafka.common.errors.TopicExistsException;
import org.apache.kafka.common.serialization.ByteArrayDeserializer;
import org.apache.kafka.common.serialization.ByteArraySerializer;

/**
 * The JVM peer of benches/fanout.rs, written as a careful Java engineer would with kafka-clients
 * and Avro's generic API, doing per event what orderflow's fan-out does:
 *
 * <ol>
 *   <li>read the order.created record (Confluent wire format) and decode it with its writer schema
 *       from the registry (cached by id), refusing another record type or bytes left over;
 *   <li>validate it with the same rules as orderflow's {@code OrderCreated::validate} (envelope ids,
 *       type, time, source, version; order id, customer, items, quantities, money, currency, the
 *       total adding up, the address);
 *   <li>send the original key, value and headers to four topics (acks=all, idempotent, lz4,
 *       linger.ms=1, as orderflow's processors configure their producer);
 *   <li>commit a partition's offset only past records whose four sends are all acknowledged (the
 *       contiguous acknowledged prefix, committed asynchronously once a second, like
 *       librdkafka's auto-commit of stored offsets in orderflow), at least once.
 * </ol>
 *
 * <p>Sends are pipelined: up to {@code --window} records (default 2000, faster for it than
 * orderflow's budget of 10,000 on this machine) may wait for their acks; when the window is full
 * the assigned partitions are paused until half of it drains. With {@code --warmup-events W} the same code first handles W events of
 * the input under another consumer group, so the JIT has compiled the hot path before the measured
 * window starts.
 *
 * <p>Prints one JSON line to stdout: events, invalid, seconds and events_per_second (from the first
 * measured event read to the ack of the last one's sends, like fanout.rs), cpu_seconds_first_to_last
 * and its per-million figure (process CPU over that window), rss_mib (VmRSS at the end) and
 * rss_max_mib (VmHWM), start_to_first_event_seconds (JVM start to the first measured event read).
 *
 * <pre>
 * FanOut --input TOPIC --events N [--bootstrap HOST:PORT] [--registry URL]
 *        [--outputs T1,T2,T3,T4 | --output-prefix P] [--group ID] [--timeout-seconds S]
 *        [--warmup-events W] [--window N]
 * </pre>
 */
public final class FanOut {

  static final String ORDER_CREATED = "orderflow.order.OrderCreated";

  public static void main(String[] argv) throws Exception {
    Map<String, String> args = parseArgs(argv);
    String bootstrap =
        args.getOrDefault("bootstrap", env("ORDERFLOW_BOOTSTRAP_SERVERS", "127.0.0.1:19092"));
    String registry =
        args.getOrDefault(
            "registry", env("ORDERFLOW_REGISTRY_URL", "http://127.0.0.1:18081/apis/ccompat/v7"));
    String input = required(args, "input");
    long expected = Long.parseLong(required(args, "events"));
    long warmup = Long.parseLong(args.getOrDefault("warmup-events", "0"));
    int window = Integer.parseInt(args.getOrDefault("window", "2000"));
    String prefix = args.getOrDefault("output-prefix", input + ".");
    List<String> outputs =
        args.containsKey("outputs")
            ? List.of(args.get("outputs").split(","))
            : List.of(prefix + "a.orders", prefix + "b.orders", prefix + "c.orders", prefix + "d.orders");
    String group = args.getOrDefault("group", "orderflow-jvm-peer-" + System.currentTimeMillis());
    long deadline =
        System.nanoTime() + Long.parseLong(args.getOrDefault("timeout-seconds", "600")) * 1_000_000_000L;

    createTopics(bootstrap, outputs);
    Worker worker = new Worker(new SchemaCache(registry), outputs, window, deadline);
    try (KafkaProducer<byte[], byte[]> producer = new KafkaProducer<>(producerProps(bootstrap))) {
      if (warmup > 0) {
        try (KafkaConsumer<byte[], byte[]> consumer =
            new KafkaConsumer<>(consumerProps(bootstrap, group + "-warmup"))) {
          worker.pass(consumer, producer, input, warmup);
        }
      }
      try (KafkaConsumer<byte[], byte[]> consumer = new KafkaConsumer<>(consumerProps(bootstrap, group))) {
        Pass measured = worker.pass(consumer, producer, input, expected);
        report(measured);
      }
    }
  }

  static Properties consumerProps(String bootstrap, String group) {
    Properties p = new Properties();
    p.put(ConsumerConfig.BOOTSTRAP_SERVERS_CONFIG, bootstrap);
    p.put(ConsumerConfig.GROUP_ID_CONFIG, group);
    // Values stay bytes: we decode them ourselves and forward the original bytes unchanged.
    p.put(ConsumerConfig.KEY_DESERIALIZER_CLASS_CONFIG, ByteArrayDeserializer.class);
    p.put(ConsumerConfig.VALUE_DESERIALIZER_CLASS_CONFIG, ByteArrayDeserializer.class);
    // We commit ourselves, only past acknowledged records (at-least-once).
    p.put(ConsumerConfig.ENABLE_AUTO_COMMIT_CONFIG, false);
    // A new group starts at the beginning of the input, so the pre-published events are read.
    p.put(ConsumerConfig.AUTO_OFFSET_RESET_CONFIG, "earliest");
    // Skip records of aborted transactions, like orderflow's processors.
    p.put(ConsumerConfig.ISOLATION_LEVEL_CONFIG, "read_committed");
    // orderflow's consumer settings: 100 ms fetch wait, cooperative rebalancing, 10 s session.
    p.put(ConsumerConfig.FETCH_MAX_WAIT_MS_CONFIG, 100);
    p.put(
        ConsumerConfig.PARTITION_ASSIGNMENT_STRATEGY_CONFIG,
        "org.apache.kafka.clients.consumer.CooperativeStickyAssignor");
    p.put(ConsumerConfig.SESSION_TIMEOUT_MS_CONFIG, 10_000);
    return p;
  }

  static Properties producerProps(String bootstrap) {
    Properties p = new Properties();
    p.put(ProducerConfig.BOOTSTRAP_SERVERS_CONFIG, bootstrap);
    p.put(ProducerConfig.KEY_SERIALIZER_CLASS_CONFIG, ByteArraySerializer.class);
    p.put(ProducerConfig.VALUE_SERIALIZER_CLASS_CONFIG, ByteArraySerializer.class);
    p.put(ProducerConfig.ACKS_CONFIG, "all");
    p.put(ProducerConfig.ENABLE_IDEMPOTENCE_CONFIG, true);
    p.put(ProducerConfig.LINGER_MS_CONFIG, 1);
    p.put(ProducerConfig.COMPRESSION_TYPE_CONFIG, "lz4");
    return p;
  }

  /** One record whose sends are in flight: done when {@code remaining} reaches 0. */
  static final class Pending {
    final long offset;
    final AtomicInteger remaining;

    Pending(long offset, int sends) {
      this.offset = offset;
      this.remaining = new AtomicInteger(sends);
    }
  }

  /** What a pass measured. */
  record Pass(long events, long invalid, long firstNanos, long lastNanos, long firstEpochMillis, double cpu) {}

  static final class Worker {
    final SchemaCache schemas;
    final List<String> outputs;
    final int window;
    final long deadline;
    final AtomicReference<Exception> sendError = new AtomicReference<>();
    BinaryDecoder decoder; // reused across records

    Worker(SchemaCache schemas, List<String> outputs, int window, long deadline) {
      this.schemas = schemas;
      this.outputs = outputs;
      this.window = window;
      this.deadline = deadline;
    }

    /** Handles {@code expected} events of {@code input} with this consumer's group. */
    Pass pass(
        KafkaConsumer<byte[], byte[]> consumer,
        KafkaProducer<byte[], byte[]> producer,
        String input,
        long expected)
        throws Exception {
      consumer.subscribe(List.of(input));
      Map<TopicPartition, ArrayDeque<Pending>> inFlight = new HashMap<>();
      Map<TopicPartition, OffsetAndMetadata> toCommit = new HashMap<>();
      AtomicReference<Exception> commitError = new AtomicReference<>();
      long read = 0, finished = 0, invalid = 0, pending = 0;
      long firstNanos = 0, firstEpochMillis = 0, lastCommit = System.nanoTime();
      double firstCpu = 0;
      boolean paused = false;
      while (finished < expected) {
        if (System.nanoTime() > deadline) {
          throw new IllegalStateException(
              "time limit reached after " + finished + " of " + expected + " events from " + input);
        }
        if (sendError.get() != null) throw new IllegalStateException("send failed", sendError.get());
        // The contiguous acknowledged prefix of each partition may be committed.
        for (var entry : inFlight.entrySet()) {
          ArrayDeque<Pending> queue = entry.getValue();
          Pending head;
          while ((head = queue.peekFirst()) != null && head.remaining.get() == 0) {
            queue.pollFirst();
            toCommit.put(entry.getKey(), new OffsetAndMetadata(head.offset + 1));
            finished++;
            pending--;
          }
        }
        if (commitError.get() != null) throw new IllegalStateException("commit failed", commitError.get());
        if (!toCommit.isEmpty() && System.nanoTime() - lastCommit > 1_000_000_000L) {
          consumer.commitAsync(
              new HashMap<>(toCommit),
              (offsets, error) -> {
                if (error != null) commitError.compareAndSet(null, error);
              });
          toCommit.clear();
          lastCommit = System.nanoTime();
        }
        // Bounded in flight: pause reading while the window is full, resume at half.
        if (!paused && pending >= window) {
          consumer.pause(consumer.assignment());
          paused = true;
        } else if (paused && pending <= window / 2) {
          consumer.resume(consumer.paused());
          paused = false;
        }
        ConsumerRecords<byte[], byte[]> batch =
            consumer.poll(Duration.ofMillis(pending > 0 ? 2 : 100));
        for (ConsumerRecord<byte[], byte[]> record : batch) {
          if (read == expected) break; // a record past the pass: read again by the next group
          if (read++ == 0) {
            firstNanos = System.nanoTime();
            firstEpochMillis = System.currentTimeMillis();
            firstCpu = cpuSeconds();
          }
          boolean valid = decodeAndValidate(record.value());
          Pending p = new Pending(record.offset(), valid ? outputs.size() : 0);
          inFlight
              .computeIfAbsent(new TopicPartition(record.topic(), record.partition()), tp -> new ArrayDeque<>())
              .addLast(p);
          pending++;
          if (!valid) {
            invalid++; // orderflow would dead-letter it; here it is only counted
            continue;
          }
          for (String output : outputs) {
            producer.send(
                new ProducerRecord<>(output, null, record.key(), record.value(), record.headers()),
                (metadata, error) -> {
                  if (error != null) sendError.compareAndSet(null, error);
                  p.remaining.decrementAndGet();
                });
          }
        }
      }
      long lastNanos = System.nanoTime();
      double cpu = cpuSeconds() - firstCpu;
      if (!toCommit.isEmpty()) consumer.commitSync(toCommit);
      consumer.unsubscribe();
      return new Pass(finished, invalid, firstNanos, lastNanos, firstEpochMillis, cpu);
    }

    /** Decodes an order.created value and checks it as orderflow does; false when refused. */
    boolean decodeAndValidate(byte[] value) {
      try {
        // Confluent wire format: magic byte 0, 4-byte big-endian schema id, Avro binary.
        if (value == null || value.length < 5 || value[0] != 0) return false;
        int schemaId = ByteBuffer.wrap(value, 1, 4).getInt();
        GenericDatumReader<GenericRecord> reader = schemas.reader(schemaId);
        if (!reader.getSchema().getFullName().equals(ORDER_CREATED)) return false;
        decoder = DecoderFactory.get().binaryDecoder(value, 5, value.length - 5, decoder);
        GenericRecord order = reader.read(null, decoder);
        if (!decoder.isEnd()) return false; // bytes left over after the record
        return Validation.orderCreated(order);
      } catch (IOException | RuntimeException e) { // truncated or corrupt Avro, a bad UUID
        return false;
      }
    }
  }

  // --- validation: orderflow's rules for order.created (src/contracts/validate.rs) -------------

  static final class Validation {
    static final long MAX_AMOUNT_MINOR = 1_000_000_000_000L;
    static final int MAX_QUANTITY = 10_000;
    static final UUID NIL = new UUID(0, 0);

    static boolean orderCreated(GenericRecord order) {
      GenericRecord envelope = (GenericRecord) order.get("envelope");
      GenericRecord data = (GenericRecord) order.get("data");
      boolean ok = id(envelope.get("event_id")) && id(envelope.get("correlation_id"));
      Object causation = envelope.get("causation_id");
      ok &= causation == null || id(causation);
      ok &= "order.created".equals(envelope.get("event_type").toString());
      ok &= (Long) envelope.get("occurred_at") > 0;
      ok &= text(envelope.get("source"));
      ok &= (Integer) envelope.get("schema_version") >= 1;

      ok &= id(data.get("order_id")) && text(data.get("customer_id"));
      List<?> items = (List<?>) data.get("items");
      ok &= !items.isEmpty();
      GenericRecord total = (GenericRecord) data.get("total");
      String currency = total.get("currency").toString();
      long sum = 0;
      boolean overflow = false;
      for (Object o : items) {
        GenericRecord item = (GenericRecord) o;
        int quantity = (Integer) item.get("quantity");
        GenericRecord price = (GenericRecord) item.get("unit_price");
        ok &= text(item.get("sku")) && quantity >= 1 && quantity <= MAX_QUANTITY && money(price);
        ok &= price.get("currency").toString().equals(currency);
        try {
          sum = Math.addExact(sum, Math.multiplyExact((Long) price.get("amount_minor"), (long) quantity));
        } catch (ArithmeticException e) {
          overflow = true;
        }
      }
      ok &= money(total) && !overflow && sum == (Long) total.get("amount_minor");
      GenericRecord address = (GenericRecord) data.get("shipping_address");
      ok &= text(address.get("line1")) && text(address.get("city")) && text(address.get("postal_code"));
      ok &= upperCode(address.get("country").toString(), 2);
      return ok;
    }

    static boolean id(Object value) {
      return !UUID.fromString(value.toString()).equals(NIL); // a malformed id throws: refused
    }

    static boolean text(Object value) {
      return !value.toString().isBlank();
    }

    static boolean money(GenericRecord money) {
      long amount = (Long) money.get("amount_minor");
      return amount >= 0 && amount <= MAX_AMOUNT_MINOR && upperCode(money.get("currency").toString(), 3);
    }

    static boolean upperCode(String code, int length) {
      if (code.length() != length) return false;
      for (int i = 0; i < length; i++) {
        char c = code.charAt(i);
        if (c < 'A' || c > 'Z') return false;
      }
      return true;
    }
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

  /** Creates the outputs up front if missing: 3 partitions (orderflow's), default replicas. */
  static void createTopics(String bootstrap, List<String> topics) throws Exception {
    try (Admin admin = Admin.create(Map.of(AdminClientConfig.BOOTSTRAP_SERVERS_CONFIG, bootstrap))) {
      List<NewTopic> wanted = new ArrayList<>();
      for (String t : topics) wanted.add(new NewTopic(t, Optional.of(3), Optional.empty()));
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

  static void report(Pass p) {
    double seconds = (p.lastNanos() - p.firstNanos()) / 1e9;
    long jvmStart = ManagementFactory.getRuntimeMXBean().getStartTime();
    System.out.println(
        String.format(
            Locale.ROOT,
            "{\"events\":%d,\"invalid\":%d,\"seconds\":%.3f,\"events_per_second\":%.1f,"
                + "\"cpu_seconds_first_to_last\":%.3f,\"cpu_seconds_first_to_last_per_million\":%.1f,"
                + "\"rss_mib\":%.1f,\"rss_max_mib\":%.1f,\"start_to_first_event_seconds\":%.3f}",
            p.events(),
            p.invalid(),
            seconds,
            seconds > 0 ? p.events() / seconds : 0,
            p.cpu(),
            p.cpu() / p.events() * 1e6,
            procStatusMiB("VmRSS"),
            procStatusMiB("VmHWM"),
            (p.firstEpochMillis() - jvmStart) / 1e3));
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
            + "              [--outputs T1,T2,T3,T4 | --output-prefix P] [--group ID] [--timeout-seconds S]\n"
            + "              [--warmup-events W] [--window N]");
    System.exit(code);
  }
}
