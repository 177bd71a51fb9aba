# orderflow: one image for every pipeline (`orderflow run <pipeline>`) and the schema Job
# (`orderflow schemas deploy`).
#
# Build stage: the crate with librdkafka compiled from its bundled sources.
FROM rust:1.95-bookworm AS build
RUN apt-get update \
 && apt-get install -y --no-install-recommends cmake pkg-config libssl-dev zlib1g-dev \
 && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY Cargo.toml Cargo.lock ./
# Cargo.toml declares the benches, so their files must exist for the manifest to load.
COPY benches benches
COPY src src
RUN cargo build --release --locked --bin orderflow \
 && strip target/release/orderflow

# Runtime stage: glibc, libssl and CA certificates, no shell, no package manager, uid 65532.
FROM gcr.io/distroless/cc-debian12:nonroot
COPY --from=build /src/target/release/orderflow /usr/local/bin/orderflow
# librdkafka links zlib, which not every distroless cc image carries (ldd: libz, libssl,
# libcrypto, libgcc_s, libc; distroless provides all but zlib for certain).
COPY --from=build /lib/*-linux-gnu/libz.so.1 /lib/
# The event contracts ship with the binary that was built against them.
COPY avro /etc/orderflow/avro
ENV ORDERFLOW_SCHEMAS_DIR=/etc/orderflow/avro \
    ORDERFLOW_PIPELINES_DIR=/etc/orderflow/pipelines \
    ORDERFLOW_METRICS_LISTEN=0.0.0.0:9464 \
    ORDERFLOW_LOG=info
USER nonroot:nonroot
EXPOSE 9464
ENTRYPOINT ["/usr/local/bin/orderflow"]
CMD ["--help"]
