"""`TrainConfig`: every training setting, one field per YAML key, from a file plus overrides.

    config = load_config("run.yaml", ["--learning_rate=1e-4", "--max_steps", "200"])

Design choices:
- The dataclass IS the schema: a YAML key is a field name, its annotation is the accepted type,
  its default the default. There is no second list of keys to keep in sync.
- Command-line values are parsed as YAML scalars (`--packing=true`, `--target_modules=[q_proj]`),
  so the file and the command line accept the same spellings. Dashes in option names are read as
  underscores (`--max-steps=10`).
- PyYAML reads `2e-4` (no dot) as a string; a float field accepts any string `float()` reads, so
  the spelling everybody writes for learning rates works.
- Every error names the key and where it came from: the file and line, or the command line; an
  unknown key gets a did-you-mean from difflib.
- Relative data paths written in a config file (`dataset`, `eval_dataset`, and each entry of
  their lists) are read from the config file's folder, so a config and its data move together and run from any directory; the
  same paths given on the command line are read from the current directory, as a shell user
  expects. A missing file fails at load time, naming the key, its line and where we looked.
- Every number must be finite: `learning_rate: .inf` or `nan` would otherwise train an adapter
  full of NaN and exit 0.
- No silent settings: a key that does not apply to the chosen method (`ONLY_FOR`), or that another
  setting makes meaningless (galore_rank without optimizer galore, warmup_ratio beside
  warmup_steps), is refused when it differs from its default, naming the key and the method,
  before anything is loaded. A default never fails: it is not a choice the user made.
"""
from __future__ import annotations

import dataclasses
import difflib
import importlib.util
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from collections.abc import Callable
from typing import Any

import yaml

SFT_METHODS = ("lora", "qlora", "full")
PREFERENCE_METHODS = ("dpo", "orpo", "kto", "simpo")
ALIGN_METHODS = (*PREFERENCE_METHODS, "grpo")   # LoRA adapters; a reference is the model with them off
METHODS = (*SFT_METHODS, *ALIGN_METHODS)
DPO_LOSSES = ("sigmoid", "ipo")
GRPO_LOSS_TYPES = ("grpo", "dr_grpo", "dapo", "bnpo")   # rl/losses.py says what each divides by
IMPORTANCE_SAMPLING = ("token", "sequence")
SCHEDULERS = ("linear", "cosine", "constant")
OPTIMIZERS = ("adamw", "adamw8bit", "galore")
# bitsandbytes' paged optimizers, which velotune does not offer (train/optim.py says why): the refusal names them.
PAGED_OPTIMIZERS = ("paged_adamw8bit", "paged_adamw")
DTYPES = ("auto", "float32", "bfloat16", "float16")
DATASET_FORMATS = ("auto", "alpaca", "sharegpt", "messages", "text")
DISTRIBUTED = ("auto", "ddp", "fsdp")
LORA_INITS = ("zero", "quant_error")
NONFINITE_ACTIONS = ("stop", "skip")
REPORT_TO = ("tensorboard",)              # where metrics go besides metrics.jsonl (train/tensorboard.py)
PATH_KEYS = ("dataset", "eval_dataset")     # read from the config file's folder when relative; lists mix files
CHATTERBOT = "chatterbot"   # `dataset: chatterbot` (or `chatterbot:ai,greetings`) = the bundled corpus


class TrainConfigError(ValueError):
    """A training config we cannot run; the message names the key and the file/line or option."""


@dataclass
class TrainConfig:
    # What to train, on what, and where the results go.
    model: str | None = None                 # path, .gguf, Hub id; None = SmolLM2-135M-Instruct
    # A data file or `datasets` save_to_disk folder, chatterbot[:category,...], or a list of them to
    # mix, each a path or {path: FILE, weight: N} (N x its rows per epoch; data/mixing.py).
    dataset: str | list[str | dict[str, Any]] = CHATTERBOT
    dataset_format: str = "auto"             # auto | alpaca | sharegpt | messages | text
    eval_dataset: str | list[str | dict[str, Any]] | None = None   # separate eval data (instead of eval_split), same forms
    eval_split: float = 0.1                  # fraction of the dataset held out for eval loss
    output_dir: str = "runs/velotune"
    method: str = "lora"                     # lora | qlora | full | dpo | orpo | kto | simpo | grpo
    # Rows into conversations (supervised methods; data/templates.py). column_template is the user
    # turn over the row's columns, "Describe {name}.[[ Born {year}.]]" ([[...]] is left out when a
    # column it names is empty); output_column holds the answer.
    column_template: str | None = None
    output_column: str | None = None
    system_prompt: str | None = None         # a system turn for every conversation that has none
    dialogue_extension: int = 1              # join N shuffled (seeded) conversations into one dialogue
    # User row functions "module:function" run in order over the raw rows before formatting (clean,
    # filter, augment), cached (data/transforms.py).
    transforms: list[str] = field(default_factory=list)
    # How long and how big.
    max_steps: int = 0                       # optimizer steps; 0 = num_epochs over the data
    num_epochs: int = 1
    micro_batch_size: int = 4
    gradient_accumulation_steps: int = 1
    max_seq_length: int = 1024
    packing: bool = False
    # Optimizer and schedule.
    optimizer: str = "adamw"                 # adamw | adamw8bit (torchao's 8-bit states) | galore
    learning_rate: float = 2e-4
    lr_scheduler: str = "cosine"             # linear | cosine | constant
    warmup_steps: int = 0
    warmup_ratio: float = 0.0                # used when warmup_steps is 0
    weight_decay: float = 0.0
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_epsilon: float = 1e-8
    max_grad_norm: float = 1.0               # 0 = no clipping
    galore_rank: int = 128
    galore_update_proj_gap: int = 200
    galore_scale: float = 0.25
    # LoRA.
    lora_r: int = 16
    lora_alpha: float = 16.0
    lora_dropout: float = 0.0
    target_modules: list[str] = field(default_factory=lambda: [
        "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
    use_rslora: bool = False
    use_dora: bool = False
    # Vision-language models: adapters on the projector (images -> decoder) too, and on the vision
    # tower (frozen by default); they do nothing for a text model.
    lora_projector: bool = True
    lora_vision_tower: bool = False
    # Modules trained in full beside the adapters (PEFT's modules_to_save), e.g. [embed_tokens,
    # lm_head] for continued pre-training or new tokens; at trainable_modules_lr (null: learning_rate).
    trainable_modules: list[str] = field(default_factory=list)
    trainable_modules_lr: float | None = None
    # Special tokens added to the tokenizer and the embeddings (rows start at the mean embedding);
    # with lora/qlora, trainable_modules must train embed_tokens (and an untied lm_head).
    new_tokens: list[str] = field(default_factory=list)
    # zero: B = 0, PEFT's start | quant_error (qlora over a 16-bit checkpoint): each adapter starts
    # as the best rank-r part of its layer's 4-bit rounding error on training rows
    # (train/error_init.py); the saved adapter then belongs to the 4-bit base
    lora_init: str = "zero"
    # Mixture of experts: weight of the router's load-balancing loss; null = the checkpoint's own
    # (config.json's router_aux_loss_coef where output_router_logits is true, as transformers applies it; else 0)
    router_aux_loss_coef: float | None = None
    # Memory and numerics.
    gradient_checkpointing: bool | str = False  # true | false | auto (only as many layers as memory needs)
    # checkpointed layer inputs to pinned CPU memory, back before backward: true | false | auto
    # (auto: on a GPU when layers are checkpointed, host memory allowing: every micro-batch when they
    # replay as CUDA graphs or the memory plan needs it, else those big enough that the GPU sets an eager step's pace)
    offload_checkpoints: bool | str = "auto"
    offload_embeddings: bool | str = "auto"  # true | false | auto: frozen untied input embeddings in host memory
    mlp_chunk_tokens: int | None = None      # MLP tiled over the sequence: null = above 16k tokens, 0 = never
    memory_budget_gib: float | None = None   # for gradient_checkpointing auto; null = GPU memory minus a margin
    cuda_graphs: bool | str = "auto"         # replay each micro-batch shape's forward+backward (auto: with packing)
    keep_16bit: list[str] = field(default_factory=lambda: ["embed_tokens", "lm_head"])  # qlora: not quantized
    keep_16bit_dynamic: int = 0              # qlora: also keep the N linears with the largest 4-bit error
    load_in_4bit: bool = False               # dpo/orpo/kto/simpo/grpo: adapters over a 4-bit NF4 base (QLoRA)
    dtype: str = "auto"                      # auto: bf16 (autocast) on a GPU, float32 on the CPU
    device: str = "auto"                     # auto | cpu | cuda | cuda:N
    seed: int = 0
    # Evaluation, logging, checkpoints.
    eval_steps: int = 0                      # 0 = eval loss only before and after training
    sample_prompts: int = 0                  # held-out prompts answered before and after training
    logging_steps: int = 1
    save_steps: int = 0                      # 0 = no intermediate checkpoints
    save_total_limit: int = 0                # keep the newest N checkpoints; 0 = keep all
    resume: bool | str = False               # true = OUTPUT_DIR/checkpoints/latest, or a path
    # A run already in output_dir is refused unless resumed or this is true: it is then moved aside
    # whole (OUTPUT_DIR.replaced-TIME), never mixed with the new one (train/run_folder.py).
    overwrite_output_dir: bool = False
    # Keys a resumed run may change although the change breaks exact resumption (the data order,
    # schedule or math differ from the interrupted run), e.g. [max_steps, learning_rate]; others
    # (logging, saving, eval, memory settings) may always change, and every difference is printed.
    resume_allow_changes: list[str] = field(default_factory=list)
    # Non-finite loss, gradient norm or learning rate (train/guard.py): stop (keep the last good
    # state as a checkpoint and name the step's rows) or skip the update and go on.
    on_nonfinite: str = "stop"
    divergence_ratio: float = 2.0            # warn when the smoothed loss passes this x its best; 0 = never
    report: bool = True                      # OUTPUT_DIR/report.md + loss/lr plot
    # Where metrics also go: [tensorboard] writes OUTPUT_DIR/tensorboard (scalars, the config, the
    # held-out answers) for TensorBoard; needs the tensorboard package (velotune[tensorboard]).
    report_to: list[str] = field(default_factory=list)
    # [first, last]: a PyTorch profiler trace of those optimizer steps (1-based, inclusive) in
    # OUTPUT_DIR/profile, and the top operations and the GPU's idle share printed (train/profiling.py).
    profile_steps: list[int] = field(default_factory=list)
    # Many GPUs under torchrun (velotune train --nproc-per-node N); see docs/distributed.md.
    distributed: str = "auto"                # auto (ddp for lora/qlora, fsdp for full) | ddp | fsdp
    fsdp_cpu_offload: bool = False           # fsdp: shards and the optimizer step live on the CPU
    fsdp_mixed_precision: bool = True        # fsdp on a GPU: gather params in bf16/fp16, reduce grads in fp32
    # Preference and RL methods (dpo, orpo, kto, simpo, grpo).
    beta: float = 0.1                        # DPO/IPO/ORPO/KTO/SimPO strength; GRPO's KL weight is grpo_beta
    dpo_loss: str = "sigmoid"                # sigmoid (DPO) or ipo
    simpo_gamma: float = 0.5                 # SimPO: the target margin between chosen and rejected
    kto_desirable_weight: float = 1.0        # KTO: lambda_D
    kto_undesirable_weight: float = 1.0      # KTO: lambda_U
    rewards: list[str] = field(default_factory=list)  # GRPO: "module:function" each
    num_generations: int = 8                 # GRPO: completions sampled per prompt
    max_completion_length: int = 128         # GRPO
    generation_batch_size: int = 0           # GRPO: completions decoded at once (0: all of a step's); the KV cache holds that many
    temperature: float = 1.0                 # GRPO sampling
    grpo_beta: float = 0.04                  # GRPO: weight of the KL term to the reference
    prompt_column: str = "prompt"            # GRPO: the dataset column holding the prompt
    loss_type: str = "grpo"                  # GRPO: grpo | dr_grpo | dapo | bnpo (how token losses are averaged)
    importance_sampling: str = "token"       # GRPO: token | sequence (GSPO: one ratio per completion)
    # Exports written at the end of the run, each "FORMAT" or "FORMAT:QUANT" (hf, gguf, ollama),
    # e.g. [hf, "ollama:q8_0"]: a merged HF folder and a q8_0 GGUF with its Ollama Modelfile.
    export: list[str] = field(default_factory=list)

    @property
    def uses_lora(self) -> bool:
        return self.method != "full"

    @property
    def four_bit(self) -> bool:
        """The base is loaded in 4-bit (qlora, or a preference/RL method with load_in_4bit)."""
        return self.method == "qlora" or self.load_in_4bit


_LORA = tuple(m for m in METHODS if m != "full")
_FOUR_BIT = ("qlora", *ALIGN_METHODS)
# Keys that apply to some methods only; every other key applies to all. A value other than the
# default for another method is refused (check_values).
ONLY_FOR: dict[str, tuple[str, ...]] = {
    **dict.fromkeys(("dataset_format", "packing", "sample_prompts", "cuda_graphs", "new_tokens", "column_template",
                     "output_column", "system_prompt", "dialogue_extension"), SFT_METHODS),
    # the preference and RL objectives read token log-probs, to which no load-balancing term is added
    "router_aux_loss_coef": SFT_METHODS,
    **dict.fromkeys(("lora_r", "lora_alpha", "lora_dropout", "target_modules", "use_rslora", "use_dora",
                     "offload_embeddings", "lora_projector", "lora_vision_tower"), _LORA),
    **dict.fromkeys(("lora_init", "keep_16bit", "keep_16bit_dynamic"), _FOUR_BIT),
    "load_in_4bit": ALIGN_METHODS,
    **dict.fromkeys(("galore_rank", "galore_update_proj_gap", "galore_scale", "fsdp_cpu_offload",
                     "fsdp_mixed_precision"), ("full",)),
    **dict.fromkeys(("trainable_modules", "trainable_modules_lr"), ("lora", "qlora", "orpo", "simpo")),
    "beta": PREFERENCE_METHODS,
    "dpo_loss": ("dpo",),
    "simpo_gamma": ("simpo",),
    **dict.fromkeys(("kto_desirable_weight", "kto_undesirable_weight"), ("kto",)),
    **dict.fromkeys(("rewards", "num_generations", "max_completion_length", "temperature", "grpo_beta",
                     "prompt_column", "loss_type", "importance_sampling", "generation_batch_size"), ("grpo",)),
}
# Why, where the plain "does not apply" would leave the user guessing.
NOT_APPLYING_BECAUSE = {
    "trainable_modules": "dpo, kto and grpo compare with the model with its adapters off, which fully "
                         "trained modules would change too",
    "cuda_graphs": "graphs replay the supervised micro-batch; preference and RL micro-batches change shape",
    "packing": "preference and RL rows are scored one sequence each",
    "sample_prompts": "it answers held-out chat prompts of a supervised dataset",
    "dataset_format": "preference and RL files have their own columns (prompt, chosen, rejected, completion, label)",
    **dict.fromkeys(("column_template", "output_column", "system_prompt", "dialogue_extension"),
                    "preference and RL rows have their own columns (prompt, chosen, rejected, completion, label); "
                    "a transform can reshape rows into them"),
}


def field_types() -> dict[str, Any]:
    return typing.get_type_hints(TrainConfig)


def load_config(path: str | Path | None = None, overrides: list[str] | None = None,
                *, base: TrainConfig | None = None) -> TrainConfig:
    """The config of `path` (or `base`, or the defaults), with `--key=value` overrides applied."""
    cli_values, cli_origins = parse_overrides(overrides or [])    # first: typos there fail fast
    values: dict[str, Any] = dataclasses.asdict(base) if base is not None else {}
    origins: dict[str, str] = {}
    if path is not None:
        file_values, file_origins = read_yaml(Path(path))
        values.update(relative_to_config(file_values, file_origins, Path(path)))
        origins.update(file_origins)
    values.update(cli_values)
    origins = {k: v for k, v in origins.items() if k.partition("[")[0] not in cli_values}
    origins.update(cli_origins)
    return build(values, origins)


def build(values: dict[str, Any], origins: dict[str, str]) -> TrainConfig:
    types_ = field_types()
    checked = {key: coerce(key, value, types_[key], origins.get(key, "config"))
               for key, value in values.items()}
    config = TrainConfig(**checked)
    check_values(config, origins)
    return config


def load_config_text(text: str, name: str, folder: Path, overrides: list[str] | None = None) -> TrainConfig:
    """A config written somewhere other than a file (the studio's form): errors say "NAME line
    N", relative data paths are read from `folder`."""
    cli_values, cli_origins = parse_overrides(overrides or [])
    values, origins = parse_yaml(text, name)
    values = relative_to_config(values, origins, folder / name)
    values.update(cli_values)
    origins = {k: v for k, v in origins.items() if k.partition("[")[0] not in cli_values}
    origins.update(cli_origins)
    return build(values, origins)


def read_yaml(path: Path) -> tuple[dict[str, Any], dict[str, str]]:
    """Values and, per key, "FILE line N"; unknown keys fail here with a did-you-mean."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise TrainConfigError(f"{path}: config file not found") from None
    return parse_yaml(text, str(path))


def parse_yaml(text: str, path: str) -> tuple[dict[str, Any], dict[str, str]]:
    """`read_yaml` of text already read; `path` names it in errors."""
    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise TrainConfigError(f"{path}: not valid YAML ({exc})") from None
    if data is None:
        return {}, {}
    if not isinstance(data, dict) or not isinstance(node, yaml.MappingNode):
        raise TrainConfigError(f"{path}: expected a mapping of keys to values at the top level")
    origins = {str(key.value): f"{path} line {key.start_mark.line + 1}" for key, _ in node.value}
    for key, value in node.value:            # entries of a list, e.g. dataset[1], get their own line
        if isinstance(value, yaml.SequenceNode):
            origins.update({f"{key.value}[{i}]": f"{path} line {item.start_mark.line + 1}"
                            for i, item in enumerate(value.value)})
    for key in data:
        check_known(str(key), origins.get(str(key), str(path)), option=False)
    return {str(k): v for k, v in data.items()}, origins


def relative_to_config(values: dict[str, Any], origins: dict[str, str], path: Path) -> dict[str, Any]:
    """`values` with relative data paths (PATH_KEYS) joined to the config file's folder; a file
    that is not there fails here, saying where it was looked for."""
    resolved = dict(values)
    for key in PATH_KEYS:
        value = values.get(key)
        if isinstance(value, str):
            resolved[key] = _from_folder(value, path, origins.get(key, str(path)), key)
        elif isinstance(value, list):        # mixed data: each entry's path, or the entry as it is
            resolved[key] = [_entry_from_folder(entry, path, origins.get(f"{key}[{i}]", str(path)), key)
                             for i, entry in enumerate(value)]
    return resolved


def _entry_from_folder(entry: Any, config_file: Path, where: str, key: str) -> Any:
    if isinstance(entry, str):
        return _from_folder(entry, config_file, where, key)
    if isinstance(entry, dict) and isinstance(entry.get("path"), str):
        return {**entry, "path": _from_folder(entry["path"], config_file, where, key)}
    return entry                             # malformed: check_values names it


def _from_folder(value: str, config_file: Path, where: str, key: str) -> str:
    if is_bundled(value) or Path(value).is_absolute():
        return value
    candidate = config_file.parent / value
    if not candidate.exists():
        raise TrainConfigError(f"{where}: key {key!r}: no file {value!r} in the config's folder (looked for "
                               f"{candidate.resolve()}; relative paths in a config file are read from its folder)")
    return str(candidate)


def is_bundled(dataset: str) -> bool:
    """`chatterbot` or `chatterbot:cat1,cat2`: the corpus shipped as a package, not a file."""
    return dataset == CHATTERBOT or dataset.startswith(CHATTERBOT + ":")


def parse_overrides(args: list[str]) -> tuple[dict[str, Any], dict[str, str]]:
    """`--key=value` or `--key value` pairs, values read as YAML scalars."""
    values: dict[str, Any] = {}
    origins: dict[str, str] = {}
    i = 0
    while i < len(args):
        arg = args[i]
        if not arg.startswith("--") or arg == "--":
            raise TrainConfigError(f"command line: unexpected argument {arg!r}; overrides look like --key=value")
        name, sep, raw = arg[2:].partition("=")
        key = name.replace("-", "_")
        check_known(key, "command line", option=True)
        if not sep:
            if i + 1 >= len(args) or args[i + 1].startswith("--"):
                raise TrainConfigError(f"command line: --{name} needs a value (--{name}=VALUE)")
            i += 1
            raw = args[i]
        try:
            values[key] = yaml.safe_load(raw) if raw.strip() else ""
        except yaml.YAMLError:
            values[key] = raw
        if isinstance(values[key], (dict, list)) and not _takes_collections(key):
            values[key] = raw                # --column_template={question}: a text with braces, not a mapping
        origins[key] = f"command line --{name}"
        i += 1
    return values, origins


def _takes_collections(key: str) -> bool:
    annotation = field_types()[key]
    options = typing.get_args(annotation) if isinstance(annotation, types.UnionType) else (annotation,)
    return any(typing.get_origin(kind) in (list, dict) for kind in options)


def check_known(key: str, where: str, *, option: bool) -> None:
    names = [f.name for f in dataclasses.fields(TrainConfig)]
    if key in names:
        return
    close = difflib.get_close_matches(key, names, n=1, cutoff=0.6)
    shown = f"--{key}" if option else repr(key)
    if close:
        hint = f"did you mean {'--' + close[0] if option else repr(close[0])}?"
    else:
        hint = f"valid keys: {', '.join(names)}"
    raise TrainConfigError(f"{where}: unknown {'option' if option else 'key'} {shown} ({hint})")


def coerce(key: str, value: Any, annotation: Any, where: str) -> Any:
    """`value` as the field's type, or a TrainConfigError naming the key and its origin."""
    options = typing.get_args(annotation) if isinstance(annotation, types.UnionType) else (annotation,)
    if value is None and type(None) in options:
        return None
    for kind in options:
        ok, converted = _convert(value, kind)
        if ok:
            return converted
    wanted = " or ".join(_describe(kind) for kind in options)
    hint = ""
    if isinstance(value, dict) and str in options:
        hint = "; YAML reads an unquoted {...} as a mapping: quote the text, e.g. '{question}'"
    raise TrainConfigError(f"{where}: key {key!r} must be {wanted}, got {value!r} ({type(value).__name__}){hint}")


def _convert(value: Any, kind: Any) -> tuple[bool, Any]:
    if kind is bool:
        return isinstance(value, bool), value
    if kind is int:
        return isinstance(value, int) and not isinstance(value, bool), value
    if kind is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return True, float(value)
        if isinstance(value, str):
            try:
                return True, float(value)
            except ValueError:
                return False, None
        return False, None
    if kind is str:
        return isinstance(value, str), value
    if isinstance(kind, types.UnionType):
        return next(((True, v) for ok, v in (_convert(value, k) for k in typing.get_args(kind)) if ok), (False, None))
    if typing.get_origin(kind) is dict:
        return isinstance(value, dict), value
    if typing.get_origin(kind) is list:
        (item,) = typing.get_args(kind)
        if isinstance(value, str) and item is str:   # one name is a list of one: --target_modules=q_proj
            value = [value]
        if not isinstance(value, list):
            return False, None
        converted = [_convert(v, item) for v in value]
        return all(ok for ok, _ in converted), [v for _, v in converted]
    return False, None


def _describe(kind: Any) -> str:
    if typing.get_origin(kind) is list:
        item = typing.get_args(kind)[0]
        return {str: "a list of strings", int: "a list of integers"}.get(
            item, "a list of data files or {path: FILE, weight: N} entries")
    return {bool: "true or false", int: "an integer", float: "a number", str: "a string",
            type(None): "null"}.get(kind, str(kind))


def check_values(config: TrainConfig, origins: dict[str, str] | str) -> None:
    """Range and choice checks, each naming the key and where its value came from."""
    def where(key: str) -> str:
        return origins if isinstance(origins, str) else origins.get(key, "default")

    def fail(key: str, message: str) -> None:
        raise TrainConfigError(f"{where(key)}: key {key!r} {message}, got {getattr(config, key)!r}")

    if config.optimizer in PAGED_OPTIMIZERS:
        fail("optimizer", "names bitsandbytes' paged optimizer, which velotune does not offer (its 8-bit AdamW "
                          "comes from torchao, which has no paged states): use optimizer: adamw8bit, whose 8-bit "
                          "states take a quarter of adamw's memory")
    for key, choices in (("method", METHODS), ("lr_scheduler", SCHEDULERS), ("optimizer", OPTIMIZERS),
                         ("dtype", DTYPES), ("dataset_format", DATASET_FORMATS), ("distributed", DISTRIBUTED),
                         ("lora_init", LORA_INITS), ("dpo_loss", DPO_LOSSES), ("loss_type", GRPO_LOSS_TYPES),
                         ("importance_sampling", IMPORTANCE_SAMPLING)):
        if getattr(config, key) not in choices:
            fail(key, f"must be one of {', '.join(choices)}")
    check_applies(config, where)
    for key in ("num_epochs", "micro_batch_size", "gradient_accumulation_steps", "lora_r", "logging_steps",
                "galore_rank", "galore_update_proj_gap", "max_completion_length", "dialogue_extension"):
        if getattr(config, key) < 1:
            fail(key, "must be at least 1")
    for key in ("max_steps", "warmup_steps", "eval_steps", "save_steps", "save_total_limit", "sample_prompts",
                "weight_decay", "max_grad_norm", "lora_dropout", "keep_16bit_dynamic", "simpo_gamma",
                "kto_desirable_weight", "kto_undesirable_weight", "grpo_beta"):
        if getattr(config, key) < 0:
            fail(key, "must not be negative")
    if config.router_aux_loss_coef is not None and config.router_aux_loss_coef < 0:
        fail("router_aux_loss_coef", "must not be negative (or null for the checkpoint's own value)")
    if config.max_seq_length < 2:
        fail("max_seq_length", "must be at least 2")
    for item in dataclasses.fields(config):
        value = getattr(config, item.name)
        if isinstance(value, float) and not math.isfinite(value):
            fail(item.name, "must be a finite number")
    for key in ("learning_rate", "beta"):
        if getattr(config, key) <= 0:
            fail(key, "must be positive")
    if config.trainable_modules_lr is not None and config.trainable_modules_lr <= 0:
        fail("trainable_modules_lr", "must be positive (or null for learning_rate)")
    check_report_to(config, fail)
    if config.on_nonfinite not in NONFINITE_ACTIONS:
        fail("on_nonfinite", f"must be one of {', '.join(NONFINITE_ACTIONS)}")
    if config.divergence_ratio != 0 and config.divergence_ratio <= 1:
        fail("divergence_ratio", "must be above 1 (or 0 to never warn)")
    for key in config.resume_allow_changes:
        check_known(key, f"{where('resume_allow_changes')}: key 'resume_allow_changes'", option=False)
    for key in ("warmup_ratio", "eval_split"):
        if not 0.0 <= getattr(config, key) < 1.0:
            fail(key, "must be in [0, 1)")
    if config.lora_dropout >= 1.0:
        fail("lora_dropout", "must be below 1")
    check_method_settings(config, fail)
    check_data_settings(config, where, fail)
    from velotune.export import ExportError, check_request

    for entry in config.export:
        to, _, quant = str(entry).partition(":")
        try:
            check_request(to, quant or None)
        except ExportError as exc:
            fail("export", f"has an entry {entry!r} that cannot be exported ({exc})")
    if not config.target_modules and config.uses_lora:
        fail("target_modules", "must name at least one module for LoRA")
    if config.optimizer == "galore" and config.method != "full":
        fail("optimizer", "galore needs method: full (it compresses full-weight gradients; use adamw with LoRA)")
    if config.distributed == "fsdp" and config.uses_lora:
        fail("distributed", f"fsdp shards full fine-tuning; method {config.method} trains adapters, which use ddp "
                            "(only adapter gradients travel): set distributed: auto or ddp")
    if config.fsdp_cpu_offload and (config.distributed == "ddp" or config.uses_lora):
        fail("fsdp_cpu_offload", "needs FSDP (method: full with distributed: auto or fsdp)")
    if config.optimizer == "galore" and config.distributed == "fsdp":
        fail("optimizer", "galore needs whole weight matrices; it cannot run on FSDP shards (use adamw)")
    if isinstance(config.gradient_checkpointing, str) and config.gradient_checkpointing != "auto":
        fail("gradient_checkpointing", "must be true, false or auto")
    if isinstance(config.cuda_graphs, str) and config.cuda_graphs != "auto":
        fail("cuda_graphs", "must be true, false or auto")
    if isinstance(config.offload_checkpoints, str) and config.offload_checkpoints != "auto":
        fail("offload_checkpoints", "must be true, false or auto")
    if config.offload_checkpoints is True and config.gradient_checkpointing is False:
        fail("offload_checkpoints", "offloads checkpointed layer inputs: it needs gradient_checkpointing true or auto")
    if isinstance(config.offload_embeddings, str) and config.offload_embeddings != "auto":
        fail("offload_embeddings", "must be true, false or auto")
    if config.offload_embeddings is True and config.method == "full":
        fail("offload_embeddings", "keeps frozen embeddings in host memory, but method full trains them "
                                   "(use auto or false)")
    if config.offload_embeddings is True and config.uses_lora and any(
            str(t).rsplit(".", 1)[-1] == "embed_tokens" for t in config.target_modules):
        fail("offload_embeddings", "keeps frozen embeddings in host memory, but target_modules puts a LoRA "
                                   "adapter on embed_tokens (use auto or false)")
    if config.mlp_chunk_tokens is not None and config.mlp_chunk_tokens < 0:
        fail("mlp_chunk_tokens", "must be null (automatic), 0 (never tile) or a positive token count")
    if config.memory_budget_gib is not None and config.memory_budget_gib <= 0:
        fail("memory_budget_gib", "must be positive (or null for the GPU's memory minus a margin)")
    if config.device != "auto" and not (config.device == "cpu" or config.device.startswith("cuda")):
        fail("device", "must be auto, cpu, cuda or cuda:N")


def check_report_to(config: TrainConfig, fail: Callable[[str, str], None]) -> None:
    """Known destinations only, and their package installed: a run must not train for hours and
    then find it cannot write what was asked."""
    for entry in config.report_to:
        if entry not in REPORT_TO:
            close = difflib.get_close_matches(str(entry), REPORT_TO, n=1)
            hint = f" (did you mean {close[0]}?)" if close else ""
            fail("report_to", f"has {entry!r}, not one of {', '.join(REPORT_TO)}{hint}")
    if "tensorboard" in config.report_to and importlib.util.find_spec("tensorboard") is None:
        fail("report_to", "names tensorboard, but the tensorboard package is not installed "
                          "(pip install 'velotune[tensorboard]')")


def is_set(config: TrainConfig, key: str) -> bool:
    """Whether `key` holds something other than its default."""
    spec = TrainConfig.__dataclass_fields__[key]
    default = spec.default_factory() if spec.default_factory is not dataclasses.MISSING else spec.default
    return getattr(config, key) != default


def check_applies(config: TrainConfig, where: Callable[[str], str]) -> None:
    """Refuse a key set for a method it does not apply to (`ONLY_FOR`), naming both."""
    for key, methods in ONLY_FOR.items():
        if config.method not in methods and is_set(config, key):
            because = NOT_APPLYING_BECAUSE.get(key)
            raise TrainConfigError(
                f"{where(key)}: key {key!r} does not apply to method {config.method} (it applies to "
                f"{', '.join(methods)}{'; ' + because if because else ''}); remove it, got {getattr(config, key)!r}")


def check_method_settings(config: TrainConfig, fail: Callable[[str, str], None]) -> None:
    """Settings that another setting of the same run makes meaningless or impossible."""
    four_bit_only = {"lora_init": "quant_error starts adapters as the 4-bit rounding error",
                     "keep_16bit": "it chooses what the 4-bit load leaves in 16-bit",
                     "keep_16bit_dynamic": "it chooses what the 4-bit load leaves in 16-bit"}
    for key, why in four_bit_only.items():
        if is_set(config, key) and not config.four_bit:
            fail(key, f"needs a 4-bit base ({why}): method qlora, or load_in_4bit: true with method {config.method}")
    for key in ("galore_rank", "galore_update_proj_gap", "galore_scale"):
        if is_set(config, key) and config.optimizer != "galore":
            fail(key, "applies to optimizer galore only")
    if is_set(config, "warmup_ratio") and config.warmup_steps > 0:
        fail("warmup_ratio", "is used only when warmup_steps is 0 (set one of them)")
    if is_set(config, "num_epochs") and config.max_steps > 0:
        fail("num_epochs", "is used only when max_steps is 0 (max_steps sets the length of the run)")
    if config.memory_budget_gib is not None and config.gradient_checkpointing != "auto":
        fail("memory_budget_gib", "is the budget of gradient_checkpointing: auto; it does nothing otherwise")
    if is_set(config, "save_total_limit") and config.save_steps == 0:
        fail("save_total_limit", "limits the checkpoints of save_steps, which is 0 (no checkpoints)")
    if config.eval_steps and not config.eval_dataset and config.eval_split == 0:
        fail("eval_steps", "needs eval data (eval_split > 0 or eval_dataset)")
    if config.trainable_modules_lr is not None and not config.trainable_modules:
        fail("trainable_modules_lr", "is the learning rate of trainable_modules, which is empty")
    if config.new_tokens and config.uses_lora and "embed_tokens" not in config.trainable_modules:
        fail("new_tokens", "adds embedding rows that only training embed_tokens can move: add embed_tokens "
                           "(and lm_head for an untied head) to trainable_modules")
    if config.method == "grpo":
        if not config.rewards:
            fail("method", "grpo needs at least one reward function in key 'rewards' ('module:function')")
        if config.num_generations < 2:
            fail("num_generations", "must be at least 2 (advantages compare completions of one prompt)")
        if (config.micro_batch_size * config.gradient_accumulation_steps) % config.num_generations:
            fail("micro_batch_size", f"x gradient_accumulation_steps counts the completions of a step, which must "
                                     f"be whole groups of num_generations = {config.num_generations}")
        if config.max_completion_length >= config.max_seq_length:
            fail("max_completion_length", f"must leave room for the prompt within max_seq_length "
                                          f"({config.max_seq_length})")
        if config.temperature <= 0:
            fail("temperature", "must be positive: greedy completions of one prompt are all alike and teach nothing")
        if config.generation_batch_size < 0:
            fail("generation_batch_size", "must be 0 (every completion of a step at once) or a positive number")


def check_data_settings(config: TrainConfig, where: Callable[[str], str], fail: Callable[[str, str], None]) -> None:
    """The data keys: dataset lists (each entry named by its own line), the column template,
    transforms and profile_steps."""
    from velotune.data import DataError
    from velotune.data.mixing import SourceError, parse_sources
    from velotune.data.templates import ColumnTemplate

    for key in PATH_KEYS:
        value = getattr(config, key)
        if value is None:
            continue
        try:
            parse_sources(value)
        except SourceError as exc:
            origin = where(f"{key}[{exc.entry}]") if exc.entry is not None else "default"
            raise TrainConfigError(f"{where(key) if origin == 'default' else origin}: key {key!r}: {exc}") from None
    if config.column_template is not None:
        if config.output_column is None:
            fail("column_template", "needs output_column (the column holding the assistant's answer)")
        try:
            ColumnTemplate(config.column_template, config.output_column or "").fields()
        except (DataError, ValueError) as exc:
            fail("column_template", f"is not a valid template ({exc}; write {{column}} for a column, [[...]] around "
                                    "an optional part, {{ and }} for literal braces)")
        if config.dataset_format != "auto":
            fail("dataset_format", "is replaced by column_template, which builds the conversations from the columns "
                                   "itself (remove one of them)")
    elif config.output_column is not None:
        fail("output_column", "is the answer column of column_template, which is not set")
    if config.dataset_format == "text":
        for key in ("system_prompt", "dialogue_extension"):
            if is_set(config, key):
                fail(key, "applies to conversations, but dataset_format text trains on raw text")
    for spec in config.transforms:
        module, sep, function = spec.partition(":")
        if not (sep and module and function):
            fail("transforms", f"entries are 'module:function'; {spec!r} is not")
    if config.profile_steps:
        steps = config.profile_steps
        if len(steps) != 2 or not 1 <= steps[0] <= steps[1]:
            fail("profile_steps", "must be [first, last]: two optimizer steps counted from 1, first <= last")
        if config.max_steps and steps[1] > config.max_steps:
            fail("profile_steps", f"ends after the run's last step (max_steps {config.max_steps})")


def config_yaml(config: TrainConfig) -> str:
    """The config as YAML (written next to every run, so it can be replayed)."""
    return yaml.safe_dump(dataclasses.asdict(config), sort_keys=False)
