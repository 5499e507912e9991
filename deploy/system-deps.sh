#!/usr/bin/env bash
# Installs the Debian packages the sandbox needs (PostgreSQL 15 with pg_stat_statements, Redis, nginx for the
# multi-node test's load balancer, ...).
# Run by `make demo`, `make test` and `make bench`; as root it uses apt-get, otherwise it names the command to run.
set -euo pipefail

declare -A NEED=(
  [/usr/lib/postgresql/15/bin/initdb]=postgresql-15
  [/usr/lib/postgresql/15/lib/pg_stat_statements.so]=postgresql-15
  [/usr/bin/psql]=postgresql-client-15
  [/usr/bin/pg_dump]=postgresql-client-15
  [/bin/gzip]=gzip
  [/usr/bin/redis-server]=redis-server
  [/usr/bin/prometheus]=prometheus
  [/usr/bin/prometheus-alertmanager]=prometheus-alertmanager
  [/usr/bin/prometheus-node-exporter]=prometheus-node-exporter
  [/usr/sbin/runuser]=util-linux
  [/usr/bin/chromium]=chromium
  [/usr/bin/podman]=podman
  [/usr/sbin/runc]=runc
  [/usr/bin/busybox]=busybox-static
  [/usr/sbin/sshd]=openssh-server
  [/usr/bin/ssh-keygen]=openssh-client
  [/usr/sbin/nginx]=nginx-light
)
missing=()
for path in "${!NEED[@]}"; do
  [ -e "$path" ] || missing+=("${NEED[$path]}")
done
python3 -c 'import venv, ensurepip' 2>/dev/null || missing+=(python3-venv)
id postgres >/dev/null 2>&1 || missing+=(postgresql-15)

if [ ${#missing[@]} -eq 0 ]; then
  exit 0
fi
mapfile -t pkgs < <(printf '%s\n' "${missing[@]}" | sort -u)
if [ "$(id -u)" -ne 0 ]; then
  echo "missing system packages: ${pkgs[*]}" >&2
  echo "install them with: sudo apt-get install -y ${pkgs[*]}" >&2
  exit 1
fi
echo "installing system packages: ${pkgs[*]}"
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
apt-get install -y -qq "${pkgs[@]}"
