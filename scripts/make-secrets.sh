#!/usr/bin/env bash
# The files docker-compose.secure.yml mounts, in ./secrets/ (git-ignored; run once, keep them private):
#   ca.pem                     a private CA (the clients' SLIMSTREAM_KAFKA_SSL_CAFILE)
#   kafka-keystore.pem         the broker's key + certificate (DNS: kafka, localhost), signed by that CA
#   kafka_server_jaas.conf     SASL/PLAIN logins the broker admits: itself and `slimstream`
#   kafka-client.properties    the broker healthcheck's client login
#   kafka_password             slimstream's password (SLIMSTREAM_KAFKA_SASL_PASSWORD_FILE)
#   qdrant_api_key, qdrant-local.yaml   the Qdrant API key, for the clients and for the server
set -euo pipefail
cd "$(dirname "$0")/.."
out=secrets
mkdir -p "$out" && chmod 700 "$out"
umask 077
rand() { openssl rand -hex 24; }
[ -f "$out/ca.pem" ] || openssl req -x509 -newkey rsa:3072 -nodes -days 825 -subj "/CN=slimstream-ca" \
    -keyout "$out/ca-key.pem" -out "$out/ca.pem" 2>/dev/null
if [ ! -f "$out/kafka-keystore.pem" ]; then
  openssl req -newkey rsa:3072 -nodes -subj "/CN=kafka" -keyout "$out/kafka-key.pem" -out "$out/kafka.csr" 2>/dev/null
  printf 'subjectAltName=DNS:kafka,DNS:localhost\n' > "$out/kafka.ext"
  openssl x509 -req -in "$out/kafka.csr" -CA "$out/ca.pem" -CAkey "$out/ca-key.pem" -CAcreateserial -days 825 \
      -extfile "$out/kafka.ext" -out "$out/kafka-cert.pem" 2>/dev/null
  # Kafka's PEM keystore: an unencrypted PKCS#8 key, then the certificate chain.
  openssl pkcs8 -topk8 -nocrypt -in "$out/kafka-key.pem" > "$out/kafka-keystore.pem"
  cat "$out/kafka-cert.pem" "$out/ca.pem" >> "$out/kafka-keystore.pem"
  rm -f "$out/kafka.csr" "$out/kafka.ext" "$out/kafka-key.pem"
fi
[ -f "$out/kafka_password" ] || rand > "$out/kafka_password"
[ -f "$out/kafka_broker_password" ] || rand > "$out/kafka_broker_password"
[ -f "$out/qdrant_api_key" ] || rand > "$out/qdrant_api_key"
app=$(cat "$out/kafka_password"); broker=$(cat "$out/kafka_broker_password")
cat > "$out/kafka_server_jaas.conf" <<JAAS
KafkaServer {
  org.apache.kafka.common.security.plain.PlainLoginModule required
  username="broker" password="$broker"
  user_broker="$broker"
  user_slimstream="$app";
};
JAAS
cat > "$out/kafka-client.properties" <<PROPS
security.protocol=SASL_SSL
sasl.mechanism=PLAIN
sasl.jaas.config=org.apache.kafka.common.security.plain.PlainLoginModule required username="broker" password="$broker";
ssl.truststore.type=PEM
ssl.truststore.location=/run/secrets/ca
PROPS
printf 'service:\n  api_key: %s\n' "$(cat "$out/qdrant_api_key")" > "$out/qdrant-local.yaml"
# The containers run as other users than this one: the files must be readable by them (the directory is not).
chmod 644 "$out"/*.pem "$out"/*.conf "$out"/*.properties "$out"/kafka_password "$out"/qdrant_api_key "$out"/qdrant-local.yaml
chmod 600 "$out/ca-key.pem" "$out/kafka_broker_password"
echo "secrets written to $out/ (docker compose -f docker-compose.yml -f docker-compose.secure.yml up)"
