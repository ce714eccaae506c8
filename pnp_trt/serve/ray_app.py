"""Scale-out on Ray Serve: the same FastAPI app (`app.py`) as a Serve deployment, one model per replica
(one GPU each where the cluster has GPUs). Ray restarts a replica that dies.

    pnp-trt serve --engines DIR --ray --replicas 2                      # a local Ray, started for it
    serve run pnp_trt.serve.ray_app:application engines=DIR replicas=4   # on a running cluster (RAY_ADDRESS)

A Serve config file names `import_path: pnp_trt.serve.ray_app:application` and the same keys as `args`.
"""

from __future__ import annotations

from typing import Any

from .limits import ServeOptions


def build_application(options: ServeOptions) -> Any:
    """The Serve application: the FastAPI app built on each replica (not pickled from here)."""
    from ray import serve

    from .app import create_app

    def build_app() -> Any:
        return create_app(options.load, options.limits(), options.coalesce_ms, options.workers)

    ingress: Any = serve.ingress(build_app)()
    deployment: Any = serve.deployment(ingress, name="pnp-trt", num_replicas=options.replicas,
                                       max_ongoing_requests=options.queue,
                                       ray_actor_options={"num_gpus": options.gpus_per_replica})
    return deployment.bind()


def application(args: dict[str, str]) -> Any:
    """Entry point for `serve run pnp_trt.serve.ray_app:application key=value ...` and Serve config files."""
    return build_application(ServeOptions.parse(args))
