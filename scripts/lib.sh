# Shell helpers shared by the setup scripts (sourced, not run).

# apt_install PKG...: install those of the Debian packages that are missing (root, or sudo), quietly.
# APT_NO_DAEMONS=1 keeps the packages' init scripts from starting system-wide daemons on install.
apt_install() {
  local missing=() p sudo="" had_policy=1
  for p in "$@"; do dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p"); done
  ((${#missing[@]})) || return 0
  [ "$(id -u)" = 0 ] || sudo="sudo"
  if [ "${APT_NO_DAEMONS:-0}" = 1 ] && [ ! -e /usr/sbin/policy-rc.d ]; then
    had_policy=0
    printf '#!/bin/sh\nexit 101\n' | $sudo tee /usr/sbin/policy-rc.d >/dev/null
    $sudo chmod +x /usr/sbin/policy-rc.d
  fi
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends \
    -o DPkg::Lock::Timeout=600 "${missing[@]}" >/dev/null
  [ "$had_policy" = 1 ] || $sudo rm -f /usr/sbin/policy-rc.d
}
