#!/usr/bin/env bash
# Starts the services the test suite talks to (RabbitMQ, PostgreSQL, MariaDB) when they are not
# running, on a Debian machine where they are installed as packages, and waits until they answer.
# A service that is not installed, or does not come up, stops the run with a line saying so.
set -euo pipefail

is_open() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

wait_open() {  # port, name
  for _ in $(seq 1 120); do
    is_open "$1" && return 0
    sleep 0.5
  done
  echo "services.sh: $2 did not come up on port $1" >&2
  return 1
}

if ! is_open 5672; then
  echo "services.sh: starting RabbitMQ"
  if command -v rabbitmq-server >/dev/null; then
    rabbitmq-server -detached || true
  else
    echo "services.sh: RabbitMQ is not installed: apt-get install rabbitmq-server (or run it in a container:" \
         "docker run -d -p 5672:5672 rabbitmq:3)" >&2
    exit 1
  fi
  wait_open 5672 RabbitMQ
fi

if ! is_open 5432; then
  echo "services.sh: starting PostgreSQL"
  if command -v pg_ctlcluster >/dev/null; then
    pg_ctlcluster --skip-systemctl-redirect "$(ls /etc/postgresql | head -n 1)" main start || true
  else
    echo "services.sh: PostgreSQL is not installed: apt-get install postgresql" >&2
    exit 1
  fi
  wait_open 5432 PostgreSQL
fi

# The token database tests run on MariaDB too (root with an empty password on 127.0.0.1, as
# Debian's package is set up here, or TEST_MARIADB_URL).
if ! is_open 3306; then
  echo "services.sh: starting MariaDB"
  if [ -x /usr/sbin/mariadbd ]; then
    start-stop-daemon --start --oknodo --background --exec /usr/sbin/mariadbd || true
  else
    echo "services.sh: MariaDB is not installed: apt-get install mariadb-server (or run it in a container:" \
         "docker run -d -p 3306:3306 -e MARIADB_ALLOW_EMPTY_ROOT_PASSWORD=1 -e MARIADB_DATABASE=test mariadb:11.4)" >&2
    exit 1
  fi
  wait_open 3306 MariaDB
fi

# RabbitMQ opens its port before it accepts AMQP logins; wait until it answers a status query.
if command -v rabbitmqctl >/dev/null; then
  for _ in $(seq 1 60); do
    rabbitmqctl -q status >/dev/null 2>&1 && break
    sleep 1
  done
fi
