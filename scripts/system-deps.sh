#!/usr/bin/env bash
# Debian packages that headless MuJoCo rendering (MUJOCO_GL=egl) needs. Installs them
# only when missing, and only as root; otherwise it says what to install.
set -euo pipefail
need=()
ldconfig -p | grep -q 'libEGL.so.1 ' || need+=(libegl1)
ldconfig -p | grep -q 'libEGL_mesa.so.0' || need+=(libegl-mesa0)
ldconfig -p | grep -q 'libGL.so.1 ' || need+=(libgl1)
[ ${#need[@]} -eq 0 ] && exit 0
if [ "$(id -u)" -eq 0 ] && command -v apt-get >/dev/null; then
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}"
else
  echo "flatworld: pixel rendering needs: ${need[*]} (apt-get install ${need[*]})" >&2
fi
