#!/usr/bin/env bash
# Debian packages lamina uses when present: Fashion-MNIST (a bundled data set)
# and Chromium (renders the HTML report in tests). Needs root; without it,
# says what to run and carries on, since both are optional for users.
set -u
need=()
dpkg -s dataset-fashion-mnist >/dev/null 2>&1 || need+=(dataset-fashion-mnist)
command -v chromium >/dev/null 2>&1 || need+=(chromium)
[ ${#need[@]} -eq 0 ] && exit 0
if [ "$(id -u)" -ne 0 ]; then
  echo "lamina: optional system packages missing: ${need[*]}"
  echo "        install them as root: apt-get update && apt-get install -y ${need[*]}"
  exit 0
fi
echo "lamina: installing system packages: ${need[*]}"
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq >/dev/null && apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null \
  || echo "lamina: could not install ${need[*]} (continuing; fashion-mnist and report rendering tests need them)"
