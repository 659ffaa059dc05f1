#!/usr/bin/env bash
# A cluster in a box: NODES emulated nodes on this machine, each a network namespace with its own host name
# (node0, node1, ...) joined by a bridge, and MPICH's mpiexec starting its proxies in them. Needs root,
# iproute2 and util-linux's unshare. Every address lives inside the namespaces made here.
#
#   scripts/cluster.sh run NODES PPN [RATE] -- CMD...   make the nodes, run CMD under mpiexec (-n NODES*PPN,
#                                                       PPN ranks per node, links limited to RATE, e.g. 1gbit,
#                                                       which CMD sees as MPITP_CLUSTER_RATE, else unlimited),
#                                                       then remove everything (also on failure and Ctrl-C)
#   scripts/cluster.sh down                             remove what a killed run left behind
#   scripts/cluster.sh nodeI CMD...                     (mpiexec's launcher: run a proxy on node I)
set -euo pipefail
PREFIX=mpitp-cl  # namespaces mpitp-cl-head, mpitp-cl-node0, ...
NET=10.213.0     # the bridge's subnet; the head (where mpiexec runs) is .254, node i is .(i+1)
HERE=$(cd "$(dirname "$0")" && pwd)

die() { echo "scripts/cluster.sh: error: $*" >&2; exit 2; }

down() {
    for ns in $(ip netns list 2>/dev/null | awk '{print $1}' | grep "^$PREFIX-" || true); do
        ip netns pids "$ns" 2>/dev/null | xargs -r kill -9 2>/dev/null || true
        ip netns del "$ns"
    done
    rm -rf /etc/netns/"$PREFIX"-* /tmp/"$PREFIX"-hostfile
}

up() {  # NODES [RATE]
    local nodes=$1 rate=${2:-} head=$PREFIX-head hosts
    ip netns add "$head"
    ip -n "$head" link set lo up
    ip -n "$head" link add br0 type bridge
    ip -n "$head" addr add "$NET.254/24" dev br0
    ip -n "$head" link set br0 up
    hosts="127.0.0.1 localhost"$'\n'"$NET.254 head"
    for i in $(seq 0 $((nodes - 1))); do
        local ns=$PREFIX-node$i
        ip netns add "$ns"
        ip link add "$PREFIX-v$i" type veth peer name eth0 netns "$ns"
        ip link set "$PREFIX-v$i" netns "$head"
        ip -n "$head" link set "$PREFIX-v$i" master br0 up
        ip -n "$ns" addr add "$NET.$((i + 1))/24" dev eth0
        ip -n "$ns" link set eth0 up
        ip -n "$ns" link set lo up
        if [ -n "$rate" ]; then  # both directions of the node's link: token bucket at RATE
            ip netns exec "$head" tc qdisc add dev "$PREFIX-v$i" root tbf rate "$rate" burst 256kb latency 100ms
            ip netns exec "$ns" tc qdisc add dev eth0 root tbf rate "$rate" burst 256kb latency 100ms
        fi
        hosts+=$'\n'"$NET.$((i + 1)) node$i"
    done
    for ns in "$head" $(seq -f "$PREFIX-node%g" 0 $((nodes - 1))); do  # ip netns exec mounts these on /etc/hosts
        mkdir -p /etc/netns/"$ns" && echo "$hosts" > /etc/netns/"$ns"/hosts
    done
}

case "${1:-}" in
node*)
    host=$1; shift
    exec ip netns exec "$PREFIX-$host" unshare --uts sh -c "hostname $host && exec $*" ;;
down)
    down ;;
run)
    nodes=$2 ppn=$3; shift 3
    rate=""; [ "${1:-}" != "--" ] && { rate=$1; shift; }
    [ "${1:-}" = "--" ] && shift
    [ "$(id -u)" = 0 ] || die "needs root (network namespaces); run it as root."
    for tool in ip unshare tc; do command -v $tool >/dev/null || die "needs '$tool' (iproute2, util-linux)."; done
    mpiexec=$(command -v mpiexec) || die "no mpiexec on PATH (make install puts MPICH's in .venv/bin)."
    "$mpiexec" -info 2>/dev/null | grep -i hydra >/dev/null || die "$mpiexec is not MPICH's Hydra launcher."
    down  # leftovers of a run that was killed
    trap down EXIT
    up "$nodes" "$rate"
    hostfile=/tmp/$PREFIX-hostfile  # MPICH's format, as on a real cluster: "host:ranks" per line
    seq -f "node%g:$ppn" 0 $((nodes - 1)) > "$hostfile"
    ip netns exec "$PREFIX-head" unshare --uts sh -c "hostname head && exec \"\$@\"" sh \
        env MPIR_CVAR_CH4_NETMOD=ofi FI_PROVIDER=tcp MPITP_CLUSTER_RATE="${rate:-unlimited}" \
        "$mpiexec" -launcher rsh -launcher-exec "$HERE/cluster.sh" \
        -f "$hostfile" -localhost "$NET.254" -n $((nodes * ppn)) "$@" &
    pid=$!  # mpiexec, once the exec chain is done: Ctrl-C and SIGTERM go to it, and it stops the ranks
    trap 'kill -INT $pid 2>/dev/null' INT
    trap 'kill -TERM $pid 2>/dev/null' TERM
    set +e
    wait $pid; status=$?
    while kill -0 $pid 2>/dev/null; do wait $pid; status=$?; done  # a trap ends a wait early: wait again
    exit $status ;;
*)
    sed -n '2,/^set /{/^#/p}' "$0" | sed 's/^# \{0,1\}//'; exit 2 ;;
esac
