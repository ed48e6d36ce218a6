#!/bin/sh
# Write docker/.env from docker/.env.example with a fresh random value for every "change-me"
# placeholder (hex for passwords and secrets, a Fernet key for AIRFLOW_FERNET_KEY).
#   docker/make-env.sh            # writes docker/.env; refuses to overwrite an existing one
#   docker/make-env.sh OUT_FILE   # writes OUT_FILE instead
set -eu

here=$(cd "$(dirname "$0")" && pwd)
out=${1:-"$here/.env"}
if [ -e "$out" ]; then
  echo "make-env: $out exists; not overwriting it (delete it first to start over)" >&2
  exit 1
fi

umask 077
tmp="$out.tmp.$$"
trap 'rm -f "$tmp"' EXIT
while IFS= read -r line || [ -n "$line" ]; do
  case "$line" in
    AIRFLOW_FERNET_KEY=change-me*)
      line="AIRFLOW_FERNET_KEY=$(openssl rand -base64 32 | tr '+/' '-_')" ;;
    [A-Z]*=change-me*)
      line="${line%%=*}=$(openssl rand -hex 24)" ;;
  esac
  printf '%s\n' "$line"
done < "$here/.env.example" > "$tmp"
mv "$tmp" "$out"
trap - EXIT
echo "make-env: wrote $out (mode 600); keep it out of git"
