#!/bin/sh
# Install the Debian packages the multi-host test harness (tests/hosts.py) needs, only when missing.
# Idempotent; must run as root on a fresh Debian machine. Usage: sh tests/hosts-deps.sh
#   openssh-server  /usr/sbin/sshd, one per simulated host
#   openssh-client  ssh, ssh-keygen
#   iproute2        ip (netns, veth, bridge)
#   util-linux      unshare, nsenter, mount (essential on Debian, listed for completeness)
set -eu

pkgs="openssh-server openssh-client iproute2 util-linux"

missing=""
for p in $pkgs; do
    # dpkg-query prints "install ok installed" only for fully installed packages.
    if ! dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed"; then
        missing="$missing $p"
    fi
done

if [ -z "$missing" ]; then
    echo "hosts-deps: all present ($pkgs)"
    exit 0
fi

if [ "$(id -u)" != 0 ]; then
    echo "hosts-deps: missing:$missing; run this script as root" >&2
    exit 1
fi

export DEBIAN_FRONTEND=noninteractive
echo "hosts-deps: installing:$missing"
# Without systemd the package's postinst cannot start sshd; policy-rc.d (exit 101) tells invoke-rc.d not to
# try at all, so the install neither fails nor leaves a system-wide sshd running on port 22.
policy=/usr/sbin/policy-rc.d
made_policy=0
if [ ! -e "$policy" ]; then
    printf '#!/bin/sh\nexit 101\n' > "$policy"
    chmod 755 "$policy"
    made_policy=1
fi
cleanup() { if [ "$made_policy" = 1 ]; then rm -f "$policy"; fi; }
trap cleanup EXIT

# shellcheck disable=SC2086  # word splitting of the package list is intended
if ! apt-get install -y --no-install-recommends $missing; then
    # A fresh machine has no package lists yet (or stale ones): refresh and try once more.
    apt-get update
    apt-get install -y --no-install-recommends $missing
fi
echo "hosts-deps: done"
