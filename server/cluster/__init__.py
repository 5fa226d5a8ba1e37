"""loraplex on Ray Serve: many replicas behind one endpoint (``loraplex serve --ray --replicas N``).

Three deployments (see docs/architecture.md, "Scaling out"):

- :mod:`.ingress` (``LoraplexIngress``): the HTTP entry. It answers ``/health`` and ``/metrics`` for the
  whole cluster, sends adapter uploads, replaces, deletes and listings to the store, and every other
  request to a replica chosen by Ray's model multiplexing, keyed by the adapter id the request names;
- :mod:`.replica` (``LoraplexReplica``): the whole single-server app (``server.app.create_app``: engine,
  routes, metrics) on one device, with a local adapter cache kept in step with the store;
- :mod:`.store` (``LoraplexStore``): the one :class:`adapters.store.AdapterStore` (index and blobs) of
  the cluster; replicas fetch an adapter's files from it by ``(id, sha256)``.

Requests cross deployments as raw HTTP (method, path, headers, body) run through the real FastAPI
apps by :mod:`.asgi_bridge`, so the cluster answers exactly as one server does.
"""
