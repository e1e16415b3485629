"""Wire codecs, one module per protocol: each a pure function from request bytes (or a gRPC
message) to validated tensors against a version's :class:`~maas_ray.serving.types.RequestSchema`,
and from output tensors back to bytes. No I/O, no Ray, no ingress state.

- :mod:`.v2`: OIP v2 over HTTP (JSON and the binary tensor extension)
- :mod:`.v1`: the v1 ``:predict`` form
- :mod:`.grpc`: OIP v2 over gRPC (``inference.ModelInferRequest``)
- :mod:`.openai`: generative, OpenAI-compatible: ``/v1/completions``, ``/v1/chat/completions``, ``/v1/models``
- :mod:`.generate`: generative, Triton's OIP generate extension; the sampling checks both share
- :mod:`.common`: the checks they share, and version references from URLs
"""
