"""erllama on more than one machine, with Ray Serve (the ``ray`` extra):

- :mod:`erllama.ray.deployment`: ``build_app(ServerConfig(...))``, the Serve application (an
  ingress and one engine replica per node running erllama's OpenAI-compatible server);
- :mod:`erllama.ray.router`: ``PrefixRouter``, the Serve request router that sends a request
  to the replica holding the longest cached prefix of its tokens;
- :mod:`erllama.ray.routing`: the router's scoring, a pure module (no Ray).

Only ``routing`` imports without Ray installed. See ``docs/guides/cluster.md``.
"""
