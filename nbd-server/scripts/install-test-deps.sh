#!/bin/sh
# Install the third-party NBD clients the nbd-server integration tests drive
# (Debian/Ubuntu, as root). The tests also try this themselves, package by
# package, when a tool is missing; this script does it up front, e.g. in CI.
set -eu
export DEBIAN_FRONTEND=noninteractive
apt-get update -q -o DPkg::Lock::Timeout=300
apt-get install -y -q -o DPkg::Lock::Timeout=300 \
    qemu-utils libnbd-bin python3-libnbd fio nbdfuse
