"""One ensemble split over several processes (hosts) with ``jax.distributed``.

Every process runs this same script, with the same data and the same seed; JAX's
multi-controller model then sees one global set of devices, and the ensemble
splits its members over all of them (``devices=`` a mesh over ``jax.devices()``).
Each process holds the members on its own devices; nothing else is exchanged
while fitting.

On N hosts (one process each)::

    python examples/multihost.py --coordinator HOST0:12345 --num-processes N --process-id I

To try it on one machine, ``--local 2`` starts two processes on the CPU, each with
two devices (four devices, 16 members)::

    python examples/multihost.py --local 2
"""

from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys


def fit(args):
    import jax

    if args.cpu_collectives:
        # CPU processes exchange the few replicated values (loss summaries) over gloo.
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(
        coordinator_address=args.coordinator,
        num_processes=args.num_processes,
        process_id=args.process_id,
    )

    from jax import random
    from jax.experimental import multihost_utils
    import jax.numpy as jnp
    from jax.sharding import Mesh
    import numpy as np
    import numpyro
    import numpyro.distributions as dist
    import optax

    from numpyro_ensemble import EnsembleMAP, per_member

    def model(x, y=None):
        w = numpyro.sample("w", dist.Normal(0.0, 1.0).expand([2]).to_event(1))
        sigma = numpyro.sample("sigma", dist.HalfNormal(1.0))
        with numpyro.plate("data", x.shape[0], subsample_size=16) as i:
            numpyro.sample("y", dist.Normal(w[0] + w[1] * x[i], sigma), obs=None if y is None else y[i])

    mesh = Mesh(np.array(jax.devices()), ("members",))  # every process's devices
    members = args.members_per_device * mesh.devices.size
    # The same data on every process: a bootstrap resample of it per member.
    x = jnp.linspace(-2.0, 2.0, 64)
    y = 0.5 + 1.5 * x + 0.3 * random.normal(random.key(0), (64,))
    rows = random.choice(random.key(1), 64, (members, 64))
    ens = EnsembleMAP(model, optax.adam(0.05), ensemble_size=members, devices=mesh)
    result = ens.run(random.key(2), 300, per_member(x[rows]), per_member(y[rows]), progress_bar=False)
    w = ens.get_points(result.params)["w"]  # a global array, split over the processes
    local = {shard.device.id: shard.data.shape[0] for shard in w.addressable_shards}
    print(f"process {jax.process_index()}: members per local device {local}", flush=True)
    w = multihost_utils.process_allgather(w, tiled=True)  # every member, on every process
    if jax.process_index() == 0:
        print(f"{members} members on {mesh.devices.size} devices of {jax.process_count()} processes")
        print(f"slope over bootstrap members: {float(w[:, 1].mean()):.3f} +- {float(w[:, 1].std()):.3f}")
    return np.asarray(w)


def launch_local(args):
    """Start ``args.local`` processes of this script on this machine (CPU devices)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    flags = f"{os.environ.get('XLA_FLAGS', '')} " \
        f"--xla_force_host_platform_device_count={args.devices_per_process}"
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": flags.strip()}
    procs = [
        subprocess.Popen(
            [sys.executable, __file__, "--coordinator", f"127.0.0.1:{port}",
             "--num-processes", str(args.local), "--process-id", str(i), "--cpu-collectives",
             "--members-per-device", str(args.members_per_device)],
            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        )
        for i in range(args.local)
    ]
    outputs = [p.communicate(timeout=args.timeout)[0] for p in procs]
    for out in outputs:
        print(out, end="")
    if any(p.returncode for p in procs):
        raise SystemExit(f"a process failed: return codes {[p.returncode for p in procs]}")
    return outputs


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--coordinator", help="host:port of process 0")
    parser.add_argument("--num-processes", type=int)
    parser.add_argument("--process-id", type=int)
    parser.add_argument("--cpu-collectives", action="store_true", help="processes on CPUs (gloo)")
    parser.add_argument("--members-per-device", type=int, default=4)
    parser.add_argument("--local", type=int, default=0, help="start this many processes here")
    parser.add_argument("--devices-per-process", type=int, default=2)
    parser.add_argument("--timeout", type=float, default=600)
    args = parser.parse_args(argv)
    if args.local:
        return launch_local(args)
    return fit(args)


if __name__ == "__main__":
    main()
