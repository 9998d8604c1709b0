#!/usr/bin/env bash
# Several "hosts" on one Linux machine, for trying multi-node launches (torchrun across nodes)
# without a cluster: each host is a network namespace with its own address, hostname and
# node-local temp folder, all joined by veth pairs to one bridge in the root namespace.
#
#   launch/netns_hosts.sh up N          # hosts PREFIX0..PREFIX(N-1); prints one line per host
#   launch/netns_hosts.sh exec I CMD... # run CMD on host I (its network, hostname and TMPDIR)
#   launch/netns_hosts.sh down          # remove every host of PREFIX, its bridge and folders
#
# Host I: namespace and hostname PREFIX$I (default tt-node$I), address SUBNET.(I+1)/24 on its
# `eth0` (default 10.77.0.1, 10.77.0.2, ...), loopback up; no route out: only these addresses and
# loopback exist there. Every host's /etc/hosts (`exec` mounts /etc/netns/NAME/hosts over it, as
# `ip netns exec` would) names all the hosts, so a hostname resolves to the address the other
# hosts reach, as on a cluster (gloo binds to what the hostname resolves to). Daemons run there
# too: `exec I slurmd -N PREFIX$I` makes host I a SLURM node (tests/launch/test_multinode.py).
# Node-local folder: `exec` sets TMPDIR=DIR/PREFIX$I/tmp, which is where twotower's per-machine
# catalogue cache goes by default (data.cache_dir unset: the system temp folder), so each host
# builds its own. A TMPDIR rather than a private mount over /tmp: the folders the hosts share (the
# prepared shards, the run folder) may themselves live under /tmp, and a mount over it would hide
# them. Everything else (the filesystem, processes) is shared, like a shared filesystem on a cluster.
#
# Environment: NETNS_PREFIX (default tt-node, at most 10 characters), NETNS_SUBNET (default
# 10.77.0, a /24), NETNS_DIR (node folders; default /tmp/twotower-netns). Needs root, iproute2
# (Debian: apt-get install iproute2) and util-linux (unshare, nsenter). `up` exits 77 when the
# kernel or the container refuses to create a network namespace (the tests then skip).
set -euo pipefail

PREFIX=${NETNS_PREFIX:-tt-node}
SUBNET=${NETNS_SUBNET:-10.77.0}
DIR=${NETNS_DIR:-/tmp/twotower-netns}
BRIDGE=$PREFIX-br

usage() { sed -n '2,25p' "$0" | sed 's/^# \{0,1\}//' >&2; exit 2; }
die() { echo "netns_hosts: $*" >&2; exit "${2:-1}"; }

preflight() {
  (( ${#PREFIX} <= 10 )) || die "NETNS_PREFIX '$PREFIX' is longer than 10 characters (interface names stop at 15)"
  [[ $(id -u) -eq 0 ]] || die "must run as root (network namespaces, veth pairs, a bridge)"
  command -v ip >/dev/null || die "no 'ip' command: apt-get install iproute2"
  command -v unshare >/dev/null && command -v nsenter >/dev/null || die "no 'unshare' or 'nsenter' command (util-linux)"
}

hosts_of() {  # the namespaces of PREFIX, in index order
  ip netns list | awk '{print $1}' | grep -E "^${PREFIX}[0-9]+$" | sort -V || true
}

hosts_file() {  # /etc/hosts as every host sees it: loopback and all N hosts
  local n=$1 i
  printf '127.0.0.1\tlocalhost\n::1\tlocalhost\n'
  for (( i = 0; i < n; i++ )); do printf '%s.%d\t%s%d\n' "$SUBNET" $(( i + 1 )) "$PREFIX" "$i"; done
}

up() {
  local n=$1 i name
  [[ $n =~ ^[0-9]+$ ]] && (( n >= 1 && n <= 250 )) || die "up N: N must be 1..250, not '$n'"
  preflight
  down quiet
  # The one step a locked-down kernel or container refuses: report it apart from real failures.
  local refused
  refused=$(ip netns add "${PREFIX}0" 2>&1) || die "cannot create a network namespace here: $refused" 77
  trap 'down quiet' ERR   # a half-made set of hosts is removed again
  ip link add "$BRIDGE" type bridge
  ip link set "$BRIDGE" up
  for (( i = 0; i < n; i++ )); do
    name=$PREFIX$i
    (( i == 0 )) || ip netns add "$name"
    ip link add "$name-h" type veth peer name eth0 netns "$name"   # host end on the bridge, node end eth0
    ip link set "$name-h" master "$BRIDGE" up
    ip -n "$name" addr add "$SUBNET.$(( i + 1 ))/24" dev eth0
    ip -n "$name" link set eth0 up
    ip -n "$name" link set lo up
    mkdir -p "/etc/netns/$name" "$DIR/$name/tmp"
    hosts_file "$n" >"/etc/netns/$name/hosts"
    echo "$name $SUBNET.$(( i + 1 )) eth0 TMPDIR=$DIR/$name/tmp"
  done
}

down() {
  local name
  for name in $(hosts_of); do
    ip link del "$name-h" 2>/dev/null || true   # removes both ends of the pair
    ip netns del "$name"
    rm -rf -- "/etc/netns/$name" "${DIR:?}/$name"
    [[ ${1:-} == quiet ]] || echo "removed $name"
  done
  if ip link show "$BRIDGE" >/dev/null 2>&1; then ip link del "$BRIDGE"; fi
  rmdir "$DIR" /etc/netns 2>/dev/null || true
}

run_on() {
  local i=$1 name=$PREFIX$1
  shift
  (( $# )) || die "exec I CMD...: no command"
  ip netns list | awk '{print $1}' | grep -qx "$name" || die "no host $name (launch/netns_hosts.sh up N first)"
  [[ -d $DIR/$name/tmp ]] || die "no folder $DIR/$name/tmp (NETNS_DIR must be the one \`up\` used)"
  # The namespace's network (nsenter), a hostname and mounts of its own (unshare), its /etc/hosts.
  # Not `ip netns exec`: that also mounts a fresh /sys, which hides the machine's cgroup mounts
  # (slurmd then refuses to start: "No filesystem mounted on /sys/fs/cgroup").
  exec nsenter --net="/run/netns/$name" unshare --uts --mount -- env TMPDIR="$DIR/$name/tmp" NETNS_NODE="$i" \
    sh -c 'mount --bind "/etc/netns/$0/hosts" /etc/hosts && hostname "$0" && exec "$@"' "$name" "$@"
}

case ${1:-} in
  up) [[ $# -eq 2 ]] || usage; up "$2" ;;
  down) [[ $# -eq 1 ]] || usage; preflight; down ;;
  exec) [[ $# -ge 3 ]] || usage; run_on "${@:2}" ;;
  *) usage ;;
esac
