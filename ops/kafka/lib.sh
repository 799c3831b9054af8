# Shared by ops/broker.sh and ops/cluster.sh (sourced, not run): Apache Kafka's jars from
# Maven Central (the version pinned once, in ops/kafka/pom.xml), its tools, the JVM settings
# of a small node, a readiness probe and a cluster id.
#
# Expects `root` (the repository root). Settings:
#   AGENTBUS_BROKER_CACHE  where the jars go, default ~/.cache/agentbus (a variable named
#                          AGENTBUS_KAFKA_* would be a librdkafka setting to agentbus)

kafka_version=$(sed -n 's:.*<kafka.version>\(.*\)</kafka.version>.*:\1:p' "$root/ops/kafka/pom.xml")
cache=${AGENTBUS_BROKER_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/agentbus}
kafka_home=$cache/kafka-$kafka_version
libs=$kafka_home/libs

as_root_apt() {
  if command -v apt-get >/dev/null && [ "$(id -u)" = 0 ]; then
    apt-get install -y -qq "$@" >/dev/null 2>&1 || { apt-get update -qq && apt-get install -y -qq "$@" >/dev/null; }
  else
    echo "missing: $* (install them, or set AGENTBUS_BROKERS to a running Kafka)" >&2
    exit 1
  fi
}

# The JVM options of one node with a heap of $1: as kafka-run-class.sh, with a small heap.
java_opts() {
  local heap=$1
  echo "-Xms$heap -Xmx$heap -server -XX:+UseG1GC -XX:MaxGCPauseMillis=20 -XX:InitiatingHeapOccupancyPercent=35 -XX:+ExplicitGCInvokesConcurrent -Djava.awt.headless=true"
}

install_kafka() {
  if [ -f "$kafka_home/.complete" ]; then
    return
  fi
  # One installer at a time (a fresh machine's first tests start several brokers at once); the
  # lock is released when the subshell ends.
  mkdir -p "$kafka_home"
  (
    flock 8
    [ -f "$kafka_home/.complete" ] && exit 0
    install_kafka_locked
  ) 8>"$kafka_home/.install.lock"
}

install_kafka_locked() {
  command -v java >/dev/null || { echo "installing a JRE from Debian..." >&2; as_root_apt default-jre-headless; }
  command -v mvn >/dev/null || { echo "installing Maven from Debian..." >&2; as_root_apt maven; }
  echo "installing Apache Kafka $kafka_version from Maven Central into $kafka_home..." >&2
  mkdir -p "$kafka_home"
  rm -rf "$libs.tmp"
  mvn -q -B -f "$root/ops/kafka/pom.xml" \
    org.apache.maven.plugins:maven-dependency-plugin:3.8.1:copy-dependencies \
    -DincludeScope=runtime -DoutputDirectory="$libs.tmp" >&2
  rm -rf "$libs"
  mv "$libs.tmp" "$libs"
  touch "$kafka_home/.complete"
}

# Runs one of Kafka's tools (or any class of its jars) with a small heap.
tool() {
  install_kafka
  local class=$1
  shift
  java -Xmx256m -XX:+UseSerialGC -XX:TieredStopAtLevel=1 \
    -Dlog4j2.configurationFile="$root/ops/kafka/log4j2-tools.properties" \
    -cp "$libs/*" "$class" "$@"
}

port_open_at() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

# One metadata request (DescribeCluster) to $1 (host:port) answered: a broker is up there, not
# only its port.
kafka_answers() {
  port_open_at "${1##*:}" || return 1
  timeout 20 java -Xmx64m -XX:+UseSerialGC -XX:TieredStopAtLevel=1 \
    -Dlog4j2.configurationFile="$root/ops/kafka/log4j2-tools.properties" \
    -cp "$libs/*" org.apache.kafka.tools.ClusterTool cluster-id --bootstrap-server "$1" >/dev/null 2>&1
}

# A cluster id as kafka-storage random-uuid makes it (16 random bytes, URL-safe base64
# without padding), without a JVM start for it. Like Kafka's Uuid.randomUuid, never one that
# starts with '-': the tool would read it as an option (1 draw in 64).
random_cluster_id() {
  local id=-
  while [ "${id#-}" != "$id" ]; do
    id=$(head -c 16 /dev/urandom | base64 | tr '+/' '-_' | tr -d '=')
  done
  echo "$id"
}
