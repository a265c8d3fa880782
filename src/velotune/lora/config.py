"""`LoraConfig`: what to adapt and how, with the same field meanings as PEFT's LoraConfig.

Design choices:
- Field names follow our trainer (`alpha`, `dropout`, `init`); `peft_format` maps them to PEFT's
  adapter_config.json keys (`lora_alpha`, `lora_dropout`, `init_lora_weights`).
- `target_modules` is matched as PEFT matches a list: an entry selects the modules whose path
  equals it or ends with "." + entry, so "q_proj" means every layer's and
  "model.layers.0.self_attn.q_proj" one (PEFT writes such paths when it expands "all-linear").
  An entry's last component must be one of the modules we can adapt. "all-linear" means the seven
  projections of every decoder layer; like PEFT's shorthand it leaves out the output head, which
  must be named explicitly.
- Vision-language models: the projector's linear layers get adapters too (`projector`, on by
  default; they are what maps the new images into the decoder), the vision tower none unless
  `vision_tower` is set, which adapts its attention and MLP projections (q/k/v/out_proj,
  fc1/fc2): a target name such as "q_proj" alone never reaches into the tower.
- The scale is alpha / r, or alpha / sqrt(r) with rsLoRA (rank-stabilised: the update's size does
  not shrink as r grows).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
EMBEDDING = "embed_tokens"
HEAD = "lm_head"
EXPERTS, ROUTER = "experts", "router"     # mixture-of-experts layers (lora/experts.py)
MLP_PROJECTIONS = ("gate_proj", "up_proj", "down_proj")
PROJECTOR_LINEARS = ("linear_1", "linear_2", "mm_input_projection")       # models/vision.py:Projector
# models/vision.py:VisionLayer (CLIP/SigLIP; Qwen2.5-VL's fused qkv and gated MLP)
VISION_LINEARS = ("q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2", "qkv", *MLP_PROJECTIONS)
PROJECTOR, VISION_TOWER = "multi_modal_projector.", "vision_tower."
KNOWN_TARGETS = (*PROJECTIONS, EMBEDDING, HEAD, EXPERTS, ROUTER, *PROJECTOR_LINEARS, "out_proj", "fc1", "fc2", "qkv")
ALL_LINEAR = "all-linear"
INITS = (True, False, "gaussian")


class LoraConfigError(ValueError):
    """A LoRA setting we cannot use; the message names the field."""


@dataclass
class LoraConfig:
    r: int = 16
    alpha: float = 16.0
    dropout: float = 0.0
    target_modules: list[str] | str = field(default_factory=lambda: list(PROJECTIONS))
    use_rslora: bool = False
    use_dora: bool = False
    # True: A kaiming-uniform (a=sqrt(5)) and B zeros, so the adapter starts as the identity;
    # "gaussian": A ~ N(0, 1/r), B zeros; False: B initialised like A (the adapter changes the
    # model from the start; PEFT's meaning, useful in tests). Embeddings swap the roles of A and B
    # (A zeros, B ~ N(0, 1)), as PEFT does. Random draws come from torch's global RNG.
    init: bool | str = True
    bias: str = "none"
    projector: bool = True              # a vision-language model's projector adapted too
    vision_tower: bool = False          # ... and its vision tower

    def __post_init__(self) -> None:
        if isinstance(self.r, bool) or not isinstance(self.r, int) or self.r <= 0:
            raise LoraConfigError(f"LoraConfig.r: must be a positive integer, got {self.r!r}")
        if not isinstance(self.alpha, (int, float)) or isinstance(self.alpha, bool) or self.alpha <= 0:
            raise LoraConfigError(f"LoraConfig.alpha: must be a positive number, got {self.alpha!r}")
        if not 0.0 <= self.dropout < 1.0:
            raise LoraConfigError(f"LoraConfig.dropout: must be in [0, 1), got {self.dropout!r}")
        if self.bias != "none":
            raise LoraConfigError(f"LoraConfig.bias: only 'none' is supported, got {self.bias!r}")
        if self.init not in INITS:
            raise LoraConfigError(f"LoraConfig.init: must be one of {INITS}, got {self.init!r}")
        self.target_modules = self.targets()

    def targets(self) -> list[str]:
        """The module names to adapt, "all-linear" expanded."""
        names = self.target_modules
        if isinstance(names, str):
            if names != ALL_LINEAR:
                raise LoraConfigError(f"LoraConfig.target_modules: a single string must be {ALL_LINEAR!r}, "
                                      f"got {names!r}")
            return list(PROJECTIONS)
        names = list(names)
        if not names:
            raise LoraConfigError("LoraConfig.target_modules: empty; name at least one module")
        unknown = [n for n in names if not isinstance(n, str) or n.rsplit(".", 1)[-1] not in KNOWN_TARGETS]
        if unknown:
            raise LoraConfigError(f"LoraConfig.target_modules: unknown module(s) {unknown}; "
                                  f"choose from {list(KNOWN_TARGETS)} or {ALL_LINEAR!r}")
        return list(dict.fromkeys(names))

    def matches(self, module_path: str) -> bool:
        last = module_path.rsplit(".", 1)[-1]
        if module_path.startswith(PROJECTOR) and self.projector and last in PROJECTOR_LINEARS:
            return True
        if module_path.startswith(VISION_TOWER):
            if self.vision_tower and last in VISION_LINEARS:
                return True   # below: only targets that name the tower's modules by path reach it
            return any(t.startswith(VISION_TOWER) and (module_path == t or module_path.endswith("." + t))
                       for t in self.targets())
        return any(module_path == t or module_path.endswith("." + t) for t in self.targets())

    def matches_experts(self, module_path: str) -> bool:
        """Stacked experts are adapted when named, or when an MLP projection is (their meaning
        on a mixture-of-experts layer)."""
        parent = module_path.rsplit(".", 1)[0]
        return self.matches(module_path) or any(self.matches(f"{parent}.{p}") for p in MLP_PROJECTIONS)

    @property
    def scale(self) -> float:
        return self.alpha / (math.sqrt(self.r) if self.use_rslora else self.r)
