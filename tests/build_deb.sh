# Sourced by the tests that install the Debian package (deb_smoke.sh,
# systemd_smoke.sh), as root on Debian 12:
#
#   apt_install LOG PACKAGE...   install without recommends; if that fails,
#                                apt-get update once and try again (a fresh
#                                machine's lists may be old or missing)
#   build_deb REPO WORK [VERSION]
#                                build tcp-intercept_*_all.deb with
#                                dpkg-buildpackage from a copy of REPO's
#                                tracked files in WORK/src (the checkout
#                                stays clean); prints the .deb's path.
#                                VERSION (e.g. 2.1.0+test1: greater than
#                                debian/changelog's, and a version for
#                                Python too): the copy's __version__ and a
#                                new changelog entry say it, for a package
#                                "N+1" to upgrade to
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
	local repo=$1 work=$2 version=${3:-} deb
	mkdir -p "$work"
	mkdir "$work/src"
	# The tracked files as they are in the working tree (less those deleted).
	(cd "$repo" && git ls-files -z | while IFS= read -r -d '' f; do
		[ ! -e "$f" ] || printf '%s\0' "$f"
	done | tar --null -T - -c) | tar -x -C "$work/src"
	[ -z "$version" ] || _bump_version "$work/src" "$version" || return 1
	if ! (cd "$work/src" && dpkg-buildpackage -us -uc -b) >"$work/build.log" 2>&1; then
		tail -n 40 "$work/build.log" >&2
		echo "dpkg-buildpackage failed (log: $work/build.log)" >&2
		return 1
	fi
	if [ -n "$version" ]; then
		deb=$work/tcp-intercept_${version#*:}_all.deb # no epoch in the name
	else
		deb=$(echo "$work"/tcp-intercept_*_all.deb)
	fi
	[ -f "$deb" ] || { echo "dpkg-buildpackage built no tcp-intercept_*_all.deb in $work" >&2; return 1; }
	echo "$deb"
}

# _bump_version SRC VERSION: the copy in SRC says VERSION, in the module
# (what the daemon reports) and in a new debian/changelog entry (the
# package's version).
_bump_version() {
	local src=$1 version=$2 old init=$1/tcp_intercept/__init__.py
	old=$(cd "$src" && dpkg-parsechangelog -S Version) || return 1
	if ! dpkg --compare-versions "$version" gt "$old"; then
		echo "build_deb: version $version is not greater than debian/changelog's $old" >&2
		return 1
	fi
	if [ "$(grep -c '^__version__ = ' "$init")" != 1 ]; then
		echo "build_deb: no single __version__ line in $init" >&2
		return 1
	fi
	sed -i "s/^__version__ = .*/__version__ = \"$version\"/" "$init"
	{
		printf 'tcp-intercept (%s) unstable; urgency=medium\n\n' "$version"
		printf '  * The tree of %s, as a newer version to upgrade to (tests).\n\n' "$old"
		printf ' -- tcp-intercept developers <tcp-intercept@example.org>  %s\n\n' \
			"$(LC_ALL=C date -R)"
		cat "$src/debian/changelog"
	} >"$src/debian/changelog.new" && mv "$src/debian/changelog.new" "$src/debian/changelog"
}
