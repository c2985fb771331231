"""Rendered supervisord configs, read back by supervisor's own parser: programs, commands, ports, GPU sets."""

import os
import shlex

import pytest
from supervisor.options import ServerOptions

from glmserve.deploy.__main__ import build_parser, spec_from_args
from glmserve.deploy.render import write_config

MULTINODE = os.path.join(os.path.dirname(__file__), "..", "..", "deploy", "multinode")


def _programs(tmp_path, *flags) -> dict[str, object]:
    a = build_parser().parse_args(["render", "--state_dir", str(tmp_path), *flags])
    spec = spec_from_args(a, str(tmp_path / "model"))
    conf = write_config(spec, str(tmp_path / "supervisord.conf"))
    opts = ServerOptions()
    opts.configfile = conf
    opts.process_config(do_usage=False)
    return {pc.name: pc for g in opts.process_group_configs for pc in g.process_configs}


def _argv(pc) -> dict[str, list[str]]:
    """flag -> values (repeated flags keep every value)."""
    words = shlex.split(pc.command)
    out: dict[str, list[str]] = {"_module": [words[2]]}
    for i, w in enumerate(words):
        if w.startswith("--") and "=" in w:
            out.setdefault(w.split("=")[0], []).append(w.split("=", 1)[1])
        elif w.startswith("--"):
            out.setdefault(w, []).append(words[i + 1] if i + 1 < len(words) and not words[i + 1].startswith("--") else "")
    return out


def test_cpu_demo(tmp_path):
    progs = _programs(tmp_path)
    assert set(progs) == {"router", "prefill_p0", "decode_d0"}
    assert all(pc.autorestart is not False and pc.stopasgroup and pc.killasgroup for pc in progs.values())
    r, p, d = _argv(progs["router"]), _argv(progs["prefill_p0"]), _argv(progs["decode_d0"])
    assert (r["_module"], p["_module"], d["_module"]) == (["glmserve.router"], ["glmserve.prefill_worker"], ["glmserve.decode_worker"])
    assert r["--port"] == ["8000"] and r["--events_addr"] == ["tcp://127.0.0.1:5600"]
    assert r["--prefill"] == ["p0=tcp://127.0.0.1:5601"] and r["--decode"] == ["d0=tcp://127.0.0.1:5611"]
    assert p["--control_addr"] == ["tcp://127.0.0.1:5601"] and p["--router_addr"] == ["tcp://127.0.0.1:5600"]
    assert p["--decode"] == ["d0=tcp://127.0.0.1:5611"] and p["--health_port"] == ["8101"]
    assert d["--link_port"] == ["5621"] and d["--health_port"] == ["8111"]
    assert d["--device"] == ["cpu"] and d["--dtype"] == ["float32"] and "--gpus" not in d
    assert d["--model_dir"] == [str(tmp_path / "model")]
    assert "--disable_overlap_schedule" not in d  # the overlap loop is the default
    assert "--expert_stats" not in d and "--expert_stats" not in p
    assert "--disable_shared_experts_fusion" not in d  # shared-expert fusion is the default
    assert progs["decode_d0"].environment["OMP_NUM_THREADS"] == "1"
    # decode (link host) starts before prefill; router first
    assert progs["router"].priority < progs["decode_d0"].priority < progs["prefill_p0"].priority


def test_gpu_node_sets_and_options(tmp_path):
    progs = _programs(tmp_path, "--device", "cuda", "--prefill", "2", "--decode", "1", "--tp", "2",
                      "--load-format", "dummy", "--mtp_step", "2", "--tool-call-parser", "glm47",
                      "--reasoning_parser", "glm45", "--port", "9000", "--port-base", "7000",
                      "--max-queue", "2048", "--disable-overlap-schedule", "--expert-stats",
                      "--disable-shared-experts-fusion")
    gpus = {name: _argv(pc).get("--gpus") for name, pc in progs.items()}
    assert gpus == {"router": None, "prefill_p0": ["0,1"], "prefill_p1": ["2,3"], "decode_d0": ["4,5"]}
    d, r = _argv(progs["decode_d0"]), _argv(progs["router"])
    assert d["--mtp_step"] == ["2"] and d["--dtype"] == ["bfloat16"] and d["--load-format"] == ["dummy"]
    assert "--mtp_step" not in _argv(progs["prefill_p1"]) and "--disable_overlap_schedule" in d
    assert all("--expert_stats" in _argv(progs[w]) for w in ("prefill_p0", "prefill_p1", "decode_d0"))
    assert all("--disable_shared_experts_fusion" in _argv(progs[w]) for w in ("prefill_p0", "prefill_p1", "decode_d0"))
    assert r["--tool_call_parser"] == ["glm47"] and r["--reasoning_parser"] == ["glm45"]
    assert r["--max_queue"] == ["2048"] and "--max_req_total_len" not in r
    assert r["--prefill"] == ["p0=tcp://127.0.0.1:7001", "p1=tcp://127.0.0.1:7002"] and r["--port"] == ["9000"]


def test_gpu_memory_utilization_reaches_every_worker(tmp_path):
    """deploy's --gpu-memory-utilization is each worker's KV sizing flag; without it, --num_pages."""
    progs = _programs(tmp_path, "--device", "cuda", "--gpu-memory-utilization", "0.45")
    for w in ("prefill_p0", "decode_d0"):
        assert _argv(progs[w])["--gpu_memory_utilization"] == ["0.45"]
    plain = _programs(tmp_path, "--device", "cuda")
    assert "--gpu_memory_utilization" not in _argv(plain["decode_d0"])


def test_explicit_gpu_sets(tmp_path):
    progs = _programs(tmp_path, "--device", "cuda", "--tp", "2", "--prefill_gpus", "6,7", "--decode_gpus", "0,1")
    assert _argv(progs["prefill_p0"])["--gpus"] == ["6,7"] and _argv(progs["decode_d0"])["--gpus"] == ["0,1"]


@pytest.mark.parametrize("flags", [
    ["--device", "cuda", "--tp", "2", "--prefill_gpus", "1,1"],  # GPU 1 twice in one TP group
    ["--device", "cuda", "--tp", "2", "--prefill_gpus", "0"],  # group of 1 for tp 2
    ["--prefill", "11"],
])
def test_bad_layouts_are_refused(tmp_path, flags):
    with pytest.raises(ValueError):
        _programs(tmp_path, *flags)


def _env_example() -> dict[str, str]:
    env = {}
    for line in open(os.path.join(MULTINODE, "fleet.env.example")):
        if line.strip() and not line.startswith("#"):
            k, _, v = line.strip().partition("=")
            env[k] = v
    return env


@pytest.mark.parametrize("role,module", [("router", "glmserve.router"), ("prefill", "glmserve.prefill_worker"), ("decode", "glmserve.decode_worker")])
def test_multinode_templates_expand(tmp_path, monkeypatch, role, module):
    env = _env_example()
    env["GLM_STATE_DIR"] = str(tmp_path)
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    opts = ServerOptions()
    opts.configfile = os.path.join(MULTINODE, f"{role}.conf")
    opts.process_config(do_usage=False)
    [pc] = [pc for g in opts.process_group_configs for pc in g.process_configs]
    a = _argv(pc)
    assert a["_module"] == [module] and "%(" not in pc.command
    if role == "router":
        assert a["--prefill"] == ["p0=tcp://10.0.0.2:5601"] and a["--decode"] == ["d0=tcp://10.0.0.3:5611"]
        assert a["--events_addr"] == ["tcp://10.0.0.1:5600"]
    else:
        assert a["--router_addr"] == ["tcp://10.0.0.1:5600"] and a["--tp"] == ["8"]
        assert a["--gpus"] == ["0,1,2,3,4,5,6,7"] and a["--control_addr"] == ["tcp://10.0.0.2:5601"]
    if role == "prefill":
        assert a["--decode"] == ["d0=tcp://10.0.0.3:5611"]


def test_multinode_template_needs_its_variables(tmp_path, monkeypatch):
    for k in _env_example():
        monkeypatch.delenv(k, raising=False)
    monkeypatch.setenv("GLM_STATE_DIR", str(tmp_path))
    opts = ServerOptions()
    opts.configfile = os.path.join(MULTINODE, "decode.conf")
    with pytest.raises(ValueError, match="GLM_"):
        opts.process_config(do_usage=False)


def test_preset_serves_the_real_config_with_dummy_weights(tmp_path):
    import json

    from glmserve.deploy.__main__ import main

    out = tmp_path / "fleet.conf"
    assert main(["render", "--preset", "glm-4.7-flash", "--device", "cuda", "--state_dir", str(tmp_path),
                 "--out", str(out)]) == 0
    text = out.read_text()
    model = tmp_path / "presets" / "glm-4.7-flash"
    cfg = json.load(open(model / "config.json"))
    assert cfg["model_type"] == "glm4_moe_lite" and cfg["num_hidden_layers"] == 47 and cfg["vocab_size"] == 154880
    assert (model / "tokenizer.json").exists()
    workers = [ln for ln in text.splitlines() if ln.startswith("command=") and "_worker" in ln]
    assert len(workers) == 2 and all(f"--model_dir {model} --load-format dummy" in ln for ln in workers)


def test_one_gpu_node_shares_it(tmp_path, monkeypatch):
    """One visible GPU: prefill and decode both on GPU 0 (their link is then the same-GPU cuda_ipc one);
    two GPUs: one each, as before; every program reads the fleet key's file from the state dir."""
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "3")
    progs = _programs(tmp_path, "--device", "cuda")
    assert {n: _argv(pc).get("--gpus") for n, pc in progs.items()} == {
        "router": None, "prefill_p0": ["0"], "decode_d0": ["0"]}
    assert all(pc.environment["GLMSERVE_FLEET_KEY_FILE"] == str(tmp_path / "fleet.key") for pc in progs.values())
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,1")
    progs = _programs(tmp_path, "--device", "cuda", "--kv_transport", "cuda_ipc")
    assert _argv(progs["prefill_p0"])["--gpus"] == ["0"] and _argv(progs["decode_d0"])["--gpus"] == ["1"]
    assert _argv(progs["decode_d0"])["--kv_transport"] == ["cuda_ipc"]


def _fake_mps_control(tmp_path, monkeypatch) -> str:
    """An executable named nvidia-cuda-mps-control alone on PATH (the real one exists only on GPU hosts)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    exe = bin_dir / "nvidia-cuda-mps-control"
    exe.write_text("#!/bin/sh\nexit 0\n")
    exe.chmod(0o755)
    monkeypatch.setenv("PATH", str(bin_dir))
    return str(exe)


def test_shared_gpu_runs_workers_under_a_private_mps_daemon(tmp_path, monkeypatch):
    """One GPU: an `mps` program (the control daemon in the foreground, its pipe dir per router port) starts
    before everything else and both workers carry its pipe dir; the router does not need it."""
    exe = _fake_mps_control(tmp_path, monkeypatch)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0")
    progs = _programs(tmp_path, "--device", "cuda", "--port", "8123")
    assert set(progs) == {"mps", "router", "prefill_p0", "decode_d0"}
    mps = progs["mps"]
    assert shlex.split(mps.command)[:2] == ["/bin/sh", "-c"] and shlex.split(mps.command)[2].endswith(f"exec {exe} -f")
    pipe = mps.environment["CUDA_MPS_PIPE_DIRECTORY"]
    assert pipe == "/tmp/glmserve-mps-8123/pipe" and f"mkdir -p {pipe} " in mps.command
    assert mps.priority < min(pc.priority for name, pc in progs.items() if name != "mps")
    for w in ("prefill_p0", "decode_d0"):
        assert progs[w].environment["CUDA_MPS_PIPE_DIRECTORY"] == pipe
        assert progs[w].environment["CUDA_MPS_LOG_DIRECTORY"] == mps.environment["CUDA_MPS_LOG_DIRECTORY"]
    assert "CUDA_MPS_PIPE_DIRECTORY" not in (progs["router"].environment or {})
    off = _programs(tmp_path, "--device", "cuda", "--mps", "off")
    assert "mps" not in off and "CUDA_MPS_PIPE_DIRECTORY" not in off["decode_d0"].environment


def test_mps_only_where_a_gpu_is_shared_or_asked(tmp_path, monkeypatch):
    """Two GPUs (one each) or cpu: no daemon under auto; --mps on forces it; on without the binary is refused."""
    _fake_mps_control(tmp_path, monkeypatch)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,1")
    assert "mps" not in _programs(tmp_path, "--device", "cuda")
    assert "mps" not in _programs(tmp_path, "--mps", "on")  # cpu: never
    forced = _programs(tmp_path, "--device", "cuda", "--mps", "on")
    assert "mps" in forced and "CUDA_MPS_PIPE_DIRECTORY" in forced["prefill_p0"].environment
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0")
    assert "mps" not in _programs(tmp_path, "--device", "cuda")  # auto without the binary: plain processes
    with pytest.raises(ValueError, match="nvidia-cuda-mps-control"):
        _programs(tmp_path, "--device", "cuda", "--mps", "on")
