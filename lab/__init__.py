"""The namespace world that the tests, the bench and the demo build and drive.

Client, router and server namespaces with the real TPROXY rules
(topology.py; the two-link MPTCP variant in mptcp_world.py), tcp-intercept
started in the router the way an operator starts it (intercept.py), the far
ends (peers.py), a steady stream of short connections (load.py), what `ss`
shows on the router (ss.py), and the primitives under them (netns.py).

No pytest in here: tests/conftest.py turns these into fixtures, and
bench/ and scripts/demo.py import them directly. It lives beside the
package, not in it, and is not shipped: setup.cfg packages tcp_intercept
alone, so the .deb carries none of it.
"""
