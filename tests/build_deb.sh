# Sourced by the tests that install the Debian package (deb_smoke.sh,
# systemd_smoke.sh), as root on Debian 12:
#
#   apt_install LOG PACKAGE...   install without recommends; if that fails,
#                                apt-get update once and try again (a fresh
#                                machine's lists may be old or missing)
#   build_deb REPO WORK          build tcp-intercept_*_all.deb with
#                                dpkg-buildpackage from a copy of REPO's
#                                tracked files in WORK/src (the checkout
#                                stays clean); prints the .deb's path
#
# DEB_BUILD_DEPS: what build_deb needs, for the caller's apt_install (one
# apt transaction with the test's own packages).
# shellcheck shell=bash

# shellcheck disable=SC2034 # for the caller
DEB_BUILD_DEPS=(debhelper dh-python python3-all python3-setuptools dpkg-dev git)

apt_install() {
	local log=$1
	shift
	local apt=(apt-get -qq -o DPkg::Lock::Timeout=300)
	"${apt[@]}" install -y --no-install-recommends "$@" >>"$log" 2>&1 </dev/null ||
		{ "${apt[@]}" update >>"$log" 2>&1 </dev/null &&
			"${apt[@]}" install -y --no-install-recommends "$@" >>"$log" 2>&1 </dev/null; } ||
		{ cat "$log" >&2; return 1; }
}

build_deb() {
	local repo=$1 work=$2 deb
	mkdir "$work/src"
	# The tracked files as they are in the working tree (less those deleted).
	(cd "$repo" && git ls-files -z | while IFS= read -r -d '' f; do
		[ ! -e "$f" ] || printf '%s\0' "$f"
	done | tar --null -T - -c) | tar -x -C "$work/src"
	if ! (cd "$work/src" && dpkg-buildpackage -us -uc -b) >"$work/build.log" 2>&1; then
		tail -n 40 "$work/build.log" >&2
		echo "dpkg-buildpackage failed (log: $work/build.log)" >&2
		return 1
	fi
	deb=$(echo "$work"/tcp-intercept_*_all.deb)
	[ -f "$deb" ] || { echo "dpkg-buildpackage built no tcp-intercept_*_all.deb in $work" >&2; return 1; }
	echo "$deb"
}
