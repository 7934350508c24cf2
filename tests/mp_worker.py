"""One process of a multi-process test job (started by launch/local.py from tests/test_multiprocess.py).

    python tests/mp_worker.py forward CKPT OUT_DIR      # logits on a mesh spanning every process
    python tests/mp_worker.py save_restore CKPT OUT_DIR # save on one mesh, restore on another; also a 1-process ckpt
    python tests/mp_worker.py hang                      # process 1 never joins the all-reduce: preflight must fail
    python tests/mp_worker.py lora_lockstep CKPT OUT ENGINE_KWARGS_JSON  # adapters loaded at run time, 2 processes
"""

import os
import sys
import time

import numpy as np

from small4_jax.parallel import distributed

IDS = (np.arange(40, dtype=np.int32)[None] * 7) % 128


def main() -> int:
    scenario = sys.argv[1]
    spec = distributed.initialize()
    import jax
    from flax import nnx
    from jax.experimental import multihost_utils

    if scenario == "hang":
        if spec.process_id == 1:
            jax.devices()  # joins the job, then stays away from the collective
            time.sleep(60)
            return 0
        try:
            distributed.preflight(deadline_s=5)
        except distributed.DistributedError as e:
            print(f"error: {e}", file=sys.stderr, flush=True)
            os._exit(3)
        return 0

    distributed.preflight(expected_devices=8, deadline_s=60)
    import small4_jax
    from small4_jax.ckpt.sharded import save_model
    from small4_jax.parallel.sharding import make_mesh

    ckpt, out = sys.argv[2], sys.argv[3]

    def logits(model):
        graphdef, state = nnx.split(model)
        out = jax.jit(lambda st: nnx.merge(graphdef, st)(IDS))(state)  # one compile, not one per op
        return np.asarray(multihost_utils.process_allgather(out, tiled=True))

    if scenario == "forward":
        mesh = make_mesh({"data": 2, "expert": 4, "tensor": 1})
        model = small4_jax.from_pretrained(ckpt, dtype="float32", mesh=mesh)
        assert not model.layer_stacks[-1].mlp.experts.gate_up[...].is_fully_addressable
        result = logits(model)
        if spec.process_id == 0:
            np.save(os.path.join(out, "forward.npy"), result)
    elif scenario == "save_restore":
        mesh_a = make_mesh({"data": 1, "expert": 8, "tensor": 1})
        model = small4_jax.from_pretrained(ckpt, dtype="float32", mesh=mesh_a)
        saved = save_model(model, os.path.join(out, "saved"))
        mesh_b = make_mesh({"data": 2, "expert": 2, "tensor": 2})
        restored = small4_jax.from_pretrained(saved, dtype="float32", mesh=mesh_b)
        assert restored.layer_stacks[-1].mlp.experts.gate_up[...].sharding.mesh.shape == mesh_b.shape
        # a checkpoint converted by one process on one device, restored across both processes' 8 devices
        converted = small4_jax.from_pretrained(os.path.join(out, "converted"), dtype="float32", mesh=mesh_b)
        results = {"saved_restored": logits(restored), "converted": logits(converted)}
        if spec.process_id == 0:
            np.savez(os.path.join(out, "save_restore.npz"), **results)
    elif scenario == "lora_lockstep":  # adapters loaded and unloaded at run time on a 2-process serving engine
        import json
        import threading

        from infer.engine.engine import SamplingOptions, merge_outputs
        from infer.server.lockstep import LockstepEngine

        mesh = make_mesh({"data": 1, "expert": 8, "tensor": 1})
        engine = LockstepEngine(small4_jax.from_pretrained(ckpt, dtype="float32", mesh=mesh), mesh=mesh, max_loras=1,
                                max_lora_rank=4, **json.loads(sys.argv[4]))
        if spec.process_id == 0:
            engine.start()

            def run(adapter):
                events, done = [], threading.Event()
                engine.submit(list(IDS[0, :19]), SamplingOptions(max_tokens=6, ignore_eos=True), adapter=adapter,
                              callback=lambda o: (events.append(o), o.finished and done.set()))
                done.wait(120)
                return merge_outputs(events).token_ids

            engine.load_adapter("a", os.path.join(out, "adapter"))
            results = {"adapter": run("a"), "base": None}
            engine.unload_adapter("a")
            results["base"] = run(None)
            engine.load_adapter("b", os.path.join(out, "adapter"))  # the freed slot, under another name
            results["again"] = run("b")
            engine.stop()
            with open(os.path.join(out, "lora_lockstep.json"), "w") as f:
                json.dump(results, f)
        else:
            engine.follow()
            assert sorted(engine.lora.adapters) == ["b"], engine.lora.adapters
    jax.distributed.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
