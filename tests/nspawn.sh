# A live systemd, Debian 12's, for testing tcp-intercept.service on a machine
# whose PID 1 is not systemd: systemd-nspawn boots a minbase bookworm in well
# under a second. Sourced (by bash, as root) by systemd_smoke.sh:
#
#   NSPAWN_HOST_PACKAGES        what the host needs, for the caller's apt-get
#   nspawn_root                 debootstrap the container's root, once: about
#                               a minute; later runs reuse it
#   nspawn_boot NAME ARG...     boot container NAME (ARG...: more options for
#                               systemd-nspawn) and wait until its boot is
#                               done; call it directly, not in $(...): it
#                               remembers the container in this shell
#   nspawn_exec NAME CMD...     run CMD in every namespace of NAME
#   nspawn_exec_online NAME CMD...
#                               the same, but in the host's network
#                               namespace: apt-get inside reaches the mirror
#   nspawn_stop NAME            power NAME off and remove its cgroups; 1 if
#                               it had to be killed
#   nspawn_stop_all             nspawn_stop every container this shell booted
#                               (for an EXIT trap)
#
# The root is read-only to the containers (--volatile=overlay: what they
# write stays in a tmpfs), so several can share it and it stays clean. It is
# kept in NSPAWN_CACHE (default /var/cache/tcp-intercept-tests); console
# logs go to NSPAWN_LOGS (default ${TMPDIR:-/tmp}).
#
# There is no systemd-machined here: machinectl, systemctl -M and
# systemd-run --machine do not work. nspawn_exec enters the container with
# nsenter instead, with the host's full capabilities; what a service sees
# is what `systemd-run --wait -P` inside shows.
# shellcheck shell=bash

# shellcheck disable=SC2034 # for the caller
NSPAWN_HOST_PACKAGES=(systemd-container debootstrap)
NSPAWN_SUITE=bookworm
# systemd-sysv: /sbin/init, without which invoke-rc.d in a postinst says
# "No init system". No procps (/bin/kill): the package must bring what its
# unit runs.
NSPAWN_INCLUDE=systemd,systemd-sysv,dbus,iproute2,python3
NSPAWN_CACHE=${NSPAWN_CACHE:-/var/cache/tcp-intercept-tests}
NSPAWN_ROOT=$NSPAWN_CACHE/$NSPAWN_SUITE-systemd
NSPAWN_LOGS=${NSPAWN_LOGS:-${TMPDIR:-/tmp}}
declare -gA NSPAWN_PID=() NSPAWN_INIT=() # by container name: systemd-nspawn, the container's PID 1

# The mirror apt uses for the suite, or none (debootstrap's default).
_nspawn_mirror() {
	# shellcheck disable=SC2016 # apt's own $(...) fields
	apt-get indextargets --format '$(REPO_URI) $(RELEASE)' 2>/dev/null |
		awk -v suite="$NSPAWN_SUITE" '$2 == suite { print $1; exit }'
}

nspawn_root() {
	local made_by="debootstrap --variant=minbase --include=$NSPAWN_INCLUDE $NSPAWN_SUITE"
	local stamp=$NSPAWN_ROOT/.made-by new=$NSPAWN_ROOT.new lock status=0 mirror
	[ "$(cat "$stamp" 2>/dev/null)" != "$made_by" ] || return 0
	mkdir -p "$NSPAWN_CACHE"
	exec {lock}>"$NSPAWN_CACHE/.lock"
	flock -w 900 "$lock" || { echo "nspawn_root: $NSPAWN_CACHE/.lock held for 15 min" >&2; return 1; }
	if [ "$(cat "$stamp" 2>/dev/null)" != "$made_by" ]; then # nobody made it while we waited
		# A debootstrap killed half-way may have left /proc or /sys mounted in it.
		findmnt -rno TARGET | grep "^$new/" | sort -r | xargs -r umount -l || true
		rm -rf --one-file-system "$new"
		mirror=$(_nspawn_mirror)
		# The old root is replaced only by a complete new one.
		if debootstrap --variant=minbase --include="$NSPAWN_INCLUDE" "$NSPAWN_SUITE" "$new" \
			${mirror:+"$mirror"} >"$NSPAWN_CACHE/debootstrap.log" 2>&1 &&
			chroot "$new" apt-get clean && rm -f "$new/etc/hostname" && # the host's: name it -M NAME
			echo "$made_by" >"$new/.made-by"; then
			rm -rf --one-file-system "$NSPAWN_ROOT"
			mv "$new" "$NSPAWN_ROOT"
		else
			tail -n 20 "$NSPAWN_CACHE/debootstrap.log" >&2
			echo "nspawn_root: debootstrap failed (log: $NSPAWN_CACHE/debootstrap.log)" >&2
			status=1
		fi
	fi
	exec {lock}>&-
	return "$status"
}

# The hierarchies a container's cgroup is made in: the named systemd one
# and cgroup2's where both are mounted (hybrid), else the cgroup2 root.
_nspawn_hierarchies() {
	local h
	if [ -e /sys/fs/cgroup/cgroup.controllers ]; then
		echo /sys/fs/cgroup
		return
	fi
	for h in /sys/fs/cgroup/systemd /sys/fs/cgroup/unified; do
		[ ! -d "$h" ] || echo "$h"
	done
}

_nspawn_cgroup() { echo "tcp-intercept-nspawn-$1"; }

nspawn_boot() {
	local name=$1
	shift
	local cg h child nspawn init='' state='' log=$NSPAWN_LOGS/nspawn-$name.log deadline
	cg=$(_nspawn_cgroup "$name")
	[ -z "${NSPAWN_PID[$name]:-}" ] || { echo "nspawn_boot: $name runs already" >&2; return 1; }
	# Each container in a cgroup of its own: with --keep-unit (no system bus
	# here to ask for a scope) two containers in one cgroup share its
	# payload/ and their systemds fight over it, and boots end "degraded".
	for h in $(_nspawn_hierarchies); do mkdir -p "$h/$cg"; done
	(
		for h in $(_nspawn_hierarchies); do echo "$BASHPID" >"$h/$cg/cgroup.procs"; done
		# setsid: the terminal's ^C is the trap's business. In a script (no
		# job control) setsid does not fork: $! is systemd-nspawn.
		exec setsid systemd-nspawn --quiet --boot --register=no --keep-unit \
			--machine="$name" --directory="$NSPAWN_ROOT" --volatile=overlay "$@"
	) >"$log" 2>&1 </dev/null &
	nspawn=$!
	NSPAWN_PID[$name]=$nspawn
	deadline=$((SECONDS + 30))
	# The container's PID 1 is the child of systemd-nspawn that is PID 1 in
	# its own namespace (nspawn forks a short-lived helper too).
	while [ -z "$init" ]; do
		for child in $(pgrep -P "$nspawn"); do
			[ "$(awk '/^NSpid:/ { print $NF }' /proc/"$child"/status 2>/dev/null)" != 1 ] || init=$child
		done
		if [ -z "$init" ] && { ! kill -0 "$nspawn" 2>/dev/null || [ "$SECONDS" -ge "$deadline" ]; }; then
			cat "$log" >&2
			echo "nspawn_boot: systemd-nspawn started no container $name" >&2
			return 1
		fi
		[ -n "$init" ] || sleep 0.05
	done
	NSPAWN_INIT[$name]=$init
	while :; do
		state=$(nspawn_exec "$name" systemctl is-system-running 2>/dev/null) || true
		case $state in running | degraded) break ;; esac
		if ! kill -0 "$nspawn" 2>/dev/null || [ "$SECONDS" -ge "$deadline" ]; then
			tail -n 30 "$log" >&2
			echo "nspawn_boot: container $name did not finish booting in 30 s (state: ${state:-none})" >&2
			return 1
		fi
		sleep 0.05
	done
	[ "$state" = running ] || nspawn_exec "$name" systemctl --failed --no-pager >&2 || true
}

# A clean environment: the host's (a locale the container lacks, a pyenv
# PATH) is not the container's.
_nspawn_env=(env -i PATH=/usr/sbin:/usr/bin:/sbin:/bin LANG=C.UTF-8)

nspawn_exec() {
	local name=$1
	shift
	nsenter --target "${NSPAWN_INIT[$name]:?no container $name}" --all "${_nspawn_env[@]}" "$@"
}

# The container's own network namespace may have no route out.
nspawn_exec_online() {
	local name=$1
	shift
	nsenter --target "${NSPAWN_INIT[$name]:?no container $name}" \
		--mount --uts --ipc --pid --cgroup --root --wd "${_nspawn_env[@]}" "$@"
}

nspawn_stop() {
	local name=$1 nspawn cg h deadline clean=0 pid pids
	nspawn=${NSPAWN_PID[$name]:-}
	[ -n "$nspawn" ] || return 0
	cg=$(_nspawn_cgroup "$name")
	# systemd-nspawn turns TERM into a clean poweroff of a --boot container.
	kill -TERM "$nspawn" 2>/dev/null || true
	deadline=$((SECONDS + 20))
	while kill -0 "$nspawn" 2>/dev/null && [ "$SECONDS" -lt "$deadline" ]; do sleep 0.05; done
	if kill -0 "$nspawn" 2>/dev/null; then
		clean=1
	else
		wait "$nspawn" 2>/dev/null || clean=1 # its exit status: 0 after a poweroff
	fi
	# Whatever is left in the container's cgroups (systemd-nspawn itself if
	# it did not exit, or what the container ran) is ours: kill it by pid.
	for h in $(_nspawn_hierarchies); do
		[ -d "$h/$cg" ] || continue
		mapfile -t pids < <(find "$h/$cg" -name cgroup.procs -exec cat {} + 2>/dev/null)
		for pid in "${pids[@]}"; do
			clean=1
			kill -KILL "$pid" 2>/dev/null || true
		done
	done
	wait "$nspawn" 2>/dev/null || true
	deadline=$((SECONDS + 10))
	for h in $(_nspawn_hierarchies); do
		while [ -d "$h/$cg" ] && [ "$SECONDS" -lt "$deadline" ]; do
			find "$h/$cg" -depth -type d -exec rmdir {} + 2>/dev/null || sleep 0.1
		done
		[ ! -d "$h/$cg" ] || { echo "nspawn_stop: cannot remove $h/$cg" >&2; clean=1; }
	done
	unset "NSPAWN_PID[$name]" "NSPAWN_INIT[$name]"
	[ "$clean" = 0 ] || echo "nspawn_stop: container $name did not power off cleanly" >&2
	return "$clean"
}

nspawn_stop_all() {
	local name status=0
	for name in "${!NSPAWN_PID[@]}"; do
		nspawn_stop "$name" || status=1
	done
	return "$status"
}
