"""The agent's local control surface: the JSON API (members, catalog, policies, keyring),
its access rules, DNS for the catalog and the Prometheus exposition.

The data plane (the rest of ``proxy/``) carries the host's traffic; this package answers
the operator and the programs on the host. ``app.make_api`` assembles every route;
``server`` is the small h11 server they run on.
"""
