"""The one config schema of eslora: OmegaConf structured configs over dataclasses.

A YAML file overrides a few keys, `key=value` arguments override the file. Unknown keys and
wrong types fail at start-up with a message naming the key (OmegaConf's struct mode does that).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence

from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from eslora.errors import EsloraError


@dataclass
class RunConfig:
    name: str = "demo"  # run folder name under `dir`
    dir: str = "runs"  # parent folder of all runs
    generations: int = 10  # ES generations (one ask/evaluate/tell each)
    # Keep the state of every Nth generation (0 = only the last); the last finished generation's
    # state is on disk after every generation whatever N is, so a kill loses only the one in flight.
    checkpoint_every: int = 5
    # Greedy held-out scores every N generations, before the first and after the last (0 = never).
    eval_every: int = 0
    time_limit_min: float = 0.0  # stop after the generation that passes this wall time (0 = none)
    # Trackers of the per-generation scalars: tensorboard (a dependency), wandb, mlflow (extras).
    report_to: list[str] = field(default_factory=lambda: ["tensorboard"])
    tracker_project: str = "eslora"  # wandb project / mlflow experiment name


@dataclass
class ModelConfig:
    # A registry name (`eslora models list`), a local HF folder or .gguf file, or a hub id
    # (org/name, from the Hugging Face cache or hub; HF_HUB_OFFLINE=1 = cache only).
    name_or_path: str = "smollm2-135m"
    dtype: str = "float32"  # compute dtype of the backend; ES master weights are always fp32
    revision: str = ""  # hub ids only: branch, tag or commit (empty = main), as in from_pretrained


@dataclass
class LoraConfig:
    r: int = 1  # the seed notes' rank; ES scales poorly with dimension, so keep it small
    alpha: float = 2.0
    # Simple module names only: SGLang refuses explicit per-layer paths (see docs/sglang.md).
    target_modules: list[str] = field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    )
    layers: Optional[list[int]] = field(default_factory=lambda: list(range(10)))  # None = every layer


@dataclass
class ESConfig:
    population: int = 8  # members per generation (even when antithetic)
    # Per-entry std of a member's weight change (A is initialised so that sigma means what it
    # means in full-weight ES; docs/es.md). The ES paper's 1e-3; EGGROLL's LoRA runs used 1e-3.
    sigma: float = 1e-3
    lr: float = 1e-3  # EGGROLL's rank-1 LoRA value; 3e-3 learned faster on SmolLM2 (docs/es.md)
    seed: int = 0  # master seed: every generation seed and all noise derive from it
    antithetic: bool = True  # mirrored pairs (+eps, -eps): lower variance, needs an even population
    shaping: str = "zscore"  # zscore (ES paper) | centered_rank (OpenAI ES) | raw
    optimizer: str = "sgd"  # sgd | adam
    weight_decay: float = 0.0  # decoupled, applied to the mean each step
    # True: step = lr * mean(w_i * eps_i) = lr * sigma * g_hat (the ES paper's update);
    # False: step = lr * g_hat. See docs/es.md.
    lr_includes_sigma: bool = True
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_eps: float = 1e-8
    init_seed: int = 0  # seed of the mean adapter's initial A matrices


@dataclass
class TaskConfig:
    # conciseness | countdown | prompts, or your own: "pkg.module:Name" / "path/to/file.py:Name"
    # (a task class or factory; docs/custom_tasks.md)
    name: str = "conciseness"
    num_prompts: int = 8  # prompts per generation, shared by every member
    max_new_tokens: int = 32
    temperature: float = 0.0  # 0 = greedy: fitness differences come from the weights, not sampling
    template: str = "chat"  # chat | raw (the ES paper's raw-text prompt ending in <think>)
    reward: str = "es_paper"  # countdown: es_paper | tinyzero
    data_path: str = ""  # countdown: JSON / JSONL / parquet file; empty = procedural generator
    data_seed: int = 1234  # seed of the procedural generator / prompt sampling
    # Protocol options (docs/tasks.md); the defaults keep fresh problems each generation and the
    # hash split. 0 = fresh problems every generation; N = N problems drawn once from data_seed,
    # reused (num_prompts = N scores all of them every generation, fewer a per-generation subset).
    train_set_size: int = 0
    train_rows: str = ""  # rows of data_path to train on, python-slice style ("0:200"); "" = hash split
    eval_rows: str = ""  # held-out rows ("-2000:") of eval_data_path, else data_path; "" = the rest
    eval_data_path: str = ""  # a separate held-out file ("" = held-out rows of data_path / the generator)
    num_numbers: list[int] = field(default_factory=lambda: [3, 4])  # countdown generator: [fewest, most] numbers
    # Arguments of task.name's class or factory (free-form: each task checks its own keys).
    kwargs: dict[str, Any] = field(default_factory=dict)
    eval_prompts: int = 64  # held-out problems used by `eslora eval` and eval_every
    eval_max_new_tokens: int = 512
    target_length: int = 20  # conciseness: reward = -|len(completion) - target_length| (characters)
    # conciseness: "reference" scores only answers that contain the question's reference answer,
    # shorter = better (brevity cannot be bought by dropping the answer); "length" is the
    # brevity-only -|len - target_length| (default: the tests' tiny model never answers right).
    conciseness_reward: str = "length"
    length_scale: float = 20.0  # conciseness "reference": characters beyond the reference that halve the brevity part


@dataclass
class SGLangConfig:
    python: str = ""  # interpreter that has sglang; empty = this one
    # SGLang's csgmv | triton | torch_native, or eslora's dense | gathered | fused (its SGLang plugin:
    # every adapter slot's LoRA as dense GEMMs, eslora/backends/dense_lora.py; each token's own slot's
    # in Triton kernels, eslora/backends/gathered_lora.py; or inside the base GEMM,
    # eslora/backends/fused_lora.py; these need eslora installed in the server's Python)
    lora_backend: str = "triton"
    # csgmv's --max-lora-chunk-size (16, 32, 64, 128; 0 = SGLang's default, 16). SGLang picks 128-row
    # chunks for batches of >= 256 tokens (every prefill chunk, decode past 256 requests) but caps
    # them at this value.
    max_lora_chunk_size: int = 0
    max_lora_rank: int = 0  # 0 = lora.r
    disable_radix_cache: bool = True
    deterministic: bool = False  # --enable-deterministic-inference
    lora_overlap_loading: bool = False  # --enable-lora-overlap-loading
    preload_dummy: bool = False  # the field notes' style: start with --lora-paths dummy=..., unload it
    attention_backend: str = ""  # e.g. triton when FA3 is absent
    sampling_backend: str = ""
    disable_cuda_graph: bool = False
    # --cuda-graph-max-bs: decode runs as a CUDA graph only up to this many running requests (SGLang's
    # default on an H200 is 256); set it to max_loras_per_batch x prompts per call when that is more.
    cuda_graph_max_bs: int = 0  # 0 = SGLang's default
    # The server's --max-loras-per-batch: adapters one server batch may mix (0 = backend.max_loras_per_batch).
    # More lets several calls' batches (cluster.calls_in_flight) run at once instead of in rounds,
    # while each call still loads only its own batch before it starts generating.
    lora_slots: int = 0
    mem_fraction_static: float = 0.0  # 0 = SGLang's default
    # LoRA kernels only on lora.layers: SGLang wraps every layer (an adapter's missing layers are
    # zeros it still multiplies); eslora's SGLang plugin, which needs eslora installed in the
    # server's Python, unwraps the rest. Adapters must then keep to lora.layers.
    adapter_layers_only: bool = False
    # Adapter loads/unloads without SGLang's free-memory log queries, each of which empties the
    # CUDA cache (4 per member); also eslora's SGLang plugin.
    lean_adapter_loads: bool = False
    # Prefill CUDA graphs with eslora's LoRA backends (dense, gathered, fused; its SGLang plugin).
    # SGLang's LoRA prefill graphs hold 32 requests (triton's static segments), so the prefill
    # chunks of short prompts (~60 requests each) run eager; eslora's kernels read each token's
    # slot, so their graphs take any request count up to the captured tokens.
    lora_prefill_graphs: bool = False
    extra_args: list[str] = field(default_factory=list)  # passed through to launch_server
    start_timeout_s: float = 600.0
    adapter_dir: str = "/dev/shm"  # RAM-backed folder for member adapters


@dataclass
class VLLMConfig:
    python: str = ".venv-vllm/bin/python"  # interpreter of the separate vLLM environment
    extra_args: list[str] = field(default_factory=list)
    start_timeout_s: float = 600.0
    kv_cache_space_gb: int = 1  # VLLM_CPU_KVCACHE_SPACE on CPU
    adapter_dir: str = "/dev/shm"


@dataclass
class BackendConfig:
    name: str = "hf"  # hf (in-process transformers+PEFT) | sglang | vllm
    max_loras_per_batch: int = 8
    max_restarts: int = 3  # a dead server is restarted this many times before the actor gives up
    request_timeout_s: float = 600.0
    sglang: SGLangConfig = field(default_factory=SGLangConfig)
    vllm: VLLMConfig = field(default_factory=VLLMConfig)


@dataclass
class ClusterConfig:
    # "" = the cluster of the Ray job that runs this driver (RAY_ADDRESS, which Ray Jobs sets),
    # else embedded local Ray, so a plain run never joins a cluster by accident; "local" = always
    # embedded; "auto" = the cluster running on this machine; host:port or ray://host:port.
    address: str = ""
    connect_timeout_s: float = 60.0  # to reach that cluster: an unreachable address fails, never hangs
    # Evaluation actors; 0 = one per `gpus_per_actor` GPUs in the cluster (per `cpus_per_actor`
    # CPUs on a CPU cluster), re-counted every generation so nodes that join get actors.
    num_actors: int = 1
    gpus_per_actor: float = 0.0  # 1 for sglang/vllm-on-GPU
    cpus_per_actor: float = 1.0  # on CPU backends also the actor's torch threads
    # Queue item size in batches of max_loras_per_batch members (0 = one equal share per actor).
    batches_per_call: int = 1
    # Calls each actor holds at once: with 2 a server backend loads the next call's adapters
    # while the current call generates.
    calls_in_flight: int = 2
    actor_start_timeout_s: float = 1800.0  # an actor (and its server) not up by then is an error
    max_actor_failures: int = 100  # lost actors per run before the driver gives up
    max_call_retries: int = 3  # reruns of one call (after faults) before the driver gives up


@dataclass
class Config:
    run: RunConfig = field(default_factory=RunConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    es: ESConfig = field(default_factory=ESConfig)
    task: TaskConfig = field(default_factory=TaskConfig)
    backend: BackendConfig = field(default_factory=BackendConfig)
    cluster: ClusterConfig = field(default_factory=ClusterConfig)
    resume: str = ""  # checkpoint file or run folder to resume from; "true" = this run's own folder
    # Resume even if the checkpoint's config differs in what changes the run (model, lora, es, task):
    # off, because such a resume silently continues a different experiment.
    resume_force: bool = False
    adapter: str = ""  # `eslora eval`: PEFT adapter folder to score (empty = base model)


DTYPES = ("float32", "bfloat16", "float16")  # model.dtype: what every backend can run


class ConfigError(EsloraError, ValueError):
    """A config file or override that does not fit the schema."""


def load_config(path: Optional[str | Path] = None, overrides: Sequence[str] = ()) -> Config:
    """Schema defaults <- YAML file <- `key=value` overrides; validated, returned as a typed Config."""
    schema = OmegaConf.structured(Config)
    try:
        merged = schema
        if path is not None:
            path = Path(path)
            if not path.is_file():
                raise ConfigError(f"config file not found: {path}")
            merged = OmegaConf.merge(merged, OmegaConf.load(path))
        if overrides:
            bad = [o for o in overrides if "=" not in o]
            if bad:
                raise ConfigError(f"overrides must look like key=value, got: {' '.join(bad)}")
            merged = OmegaConf.merge(merged, OmegaConf.from_dotlist(list(overrides)))
    except OmegaConfBaseException as err:
        where = f" in {path}" if path is not None else ""
        raise ConfigError(f"bad config{where}: {_first_line(err)}") from None
    cfg: Config = OmegaConf.to_object(merged)  # type: ignore[assignment]
    validate(cfg)
    return cfg


def validate(cfg: Config) -> None:
    """Every value rule, at load, before Ray starts; each message names the key.

    Each section's owner holds its own rules (es, tasks, backends, cluster); the sections this
    module owns (run, model, lora) are checked here.
    """
    from eslora.backends import validate_config as validate_backend
    from eslora.backends.sglang_plugin import LORA_BACKEND_CLASSES, PROJECTION_MODULES
    from eslora.cluster import validate_config as validate_cluster
    from eslora.es import validate_config as validate_es
    from eslora.tasks import validate_config as validate_task
    from eslora.tracking import TRACKERS

    # eslora's own SGLang LoRA backends read SGLang's buffers as rank lora.r on the 7 projections
    plugin_backend = cfg.backend.name == "sglang" and cfg.backend.sglang.lora_backend in LORA_BACKEND_CLASSES
    checks = [
        (cfg.run.generations >= 0, "run.generations must be >= 0"),
        (cfg.run.time_limit_min >= 0, "run.time_limit_min must be >= 0 (0 = no limit)"),
        (cfg.run.checkpoint_every >= 0, "run.checkpoint_every must be >= 0 (0 = keep only the last state)"),
        (all(t in TRACKERS for t in cfg.run.report_to),
         f"run.report_to={list(cfg.run.report_to)}: use any of {', '.join(TRACKERS)}"),
        (cfg.model.dtype in DTYPES, f"model.dtype={cfg.model.dtype!r}: use one of {', '.join(DTYPES)}"),
        (cfg.lora.r >= 1, "lora.r must be >= 1"),
        (cfg.lora.alpha > 0 and math.isfinite(cfg.lora.alpha), f"lora.alpha={cfg.lora.alpha} must be finite and > 0"),
        (all("." not in m for m in cfg.lora.target_modules),
         "lora.target_modules must be simple module names (q_proj, ...); choose layers with lora.layers"),
        # across sections: what the SGLang server leaves LoRA kernels off is what the adapter leaves out
        (not (cfg.backend.name == "sglang" and cfg.backend.sglang.adapter_layers_only and cfg.lora.layers is None),
         "backend.sglang.adapter_layers_only=true needs lora.layers: with lora.layers=null every layer is trained, "
         "so there is no layer to run without LoRA kernels"),
        (not (plugin_backend and cfg.backend.sglang.max_lora_rank not in (0, cfg.lora.r)),
         f"backend.sglang.lora_backend={cfg.backend.sglang.lora_backend} needs every adapter at the server's max rank: "
         f"leave backend.sglang.max_lora_rank at 0 or lora.r={cfg.lora.r}, not {cfg.backend.sglang.max_lora_rank}"),
        (not (plugin_backend and not set(cfg.lora.target_modules) <= PROJECTION_MODULES),
         f"backend.sglang.lora_backend={cfg.backend.sglang.lora_backend} serves LoRA on "
         f"{', '.join(sorted(PROJECTION_MODULES))}; lora.target_modules={list(cfg.lora.target_modules)} has others"),
    ]
    for ok, message in checks:
        if not ok:
            raise ConfigError(message)
    for check, section in ((validate_es, cfg.es), (validate_task, cfg.task), (validate_backend, cfg.backend),
                           (validate_cluster, cfg.cluster)):
        try:
            check(section)
        except ValueError as err:
            raise ConfigError(str(err)) from None


def to_yaml(cfg: Config) -> str:
    return OmegaConf.to_yaml(OmegaConf.structured(cfg))


def to_dict(cfg: Config) -> dict[str, Any]:
    return OmegaConf.to_container(OmegaConf.structured(cfg))  # type: ignore[return-value]


def from_dict(data: dict[str, Any]) -> Config:
    cfg: Config = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(Config), data))  # type: ignore[assignment]
    return cfg


def _first_line(err: Exception) -> str:
    text = str(err).strip()
    # OmegaConf appends a "full_key: ..." block; keep the message and the key.
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    key = next((line for line in lines if line.startswith("full_key:")), "")
    return f"{lines[0]} ({key})" if key and key not in lines[0] else lines[0]
