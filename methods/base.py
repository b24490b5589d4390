"""The method interface: linearize a pretrained model, then recover its quality.

`Method` is the plugin contract. `LinearMethod` is the shared implementation that the
built-in methods configure: it swaps every decoder layer's attention for a
`LinearizedAttention` around the mixer the method builds. Recovery (attention transfer,
then LoRA) is the harness's job (linbench.recovery), driven by the stage fields of the
method's config; methods never import it.

A method declares its `role` for the report: "parent" (the unmodified model every other
row is compared with), "baseline" (a training-free reference such as sliding-window
attention) or "linearized".
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import ClassVar

from linbench.errors import LinbenchError, one_of


@dataclass
class MethodConfig:
    """Every knob of a method, with the paper's default. Subclasses add fields."""
    # fields added after checkpoints were first saved -> the value that reproduces a
    # checkpoint saved without them (methods.io.method_of fills these in)
    ADDED: ClassVar[dict] = {}


ROLES = ("parent", "baseline", "linearized")


class Method:
    name: ClassVar[str]
    role: ClassVar[str] = "linearized"      # one of ROLES
    config_cls: ClassVar[type] = MethodConfig

    def __init__(self, config: MethodConfig | None = None, **overrides):
        self.config = config if config is not None else self.config_cls()
        if overrides:
            self.config = dataclasses.replace(self.config, **overrides)

    def config_dict(self) -> dict:
        return dataclasses.asdict(self.config)

    def linearize(self, model):
        """Swap attention modules in place and add the method's parameters."""
        raise NotImplementedError

    def needs_recovery(self) -> bool:
        """Whether linbench.recovery has stages to run for this config."""
        return False

    def window(self) -> int | None:
        """Exact-attention window in tokens: None = all tokens (softmax), 0 = none."""
        return None

    def state_bytes(self, model, seqlen: int) -> int:
        """Bytes of recurrent state (or KV cache) per sequence at `seqlen` tokens."""
        raise NotImplementedError

    def mixer(self, heads: int, head_dim: int, backend: str = "auto"):
        """A module computing this method's sequence mixing on (B, T, H, D) q, k, v
        (fresh parameters), for kernel-level speed sweeps."""
        raise NotImplementedError


# Recovery adapters (stage 2), all through peft: LoRA, and LoRA initialized by PiSSA
# (arXiv 2404.02948), EVA (arXiv 2410.07170) or CorDA (arXiv 2406.05223); "bone" is peft's
# MiSS, the successor of Bone (arXiv 2409.15371). linbench.recovery.adapters builds them.
ADAPTERS = ("lora", "pissa", "eva", "corda", "bone")
INITS = ("calibrated", "paper")  # see LinearConfig.init
DISTILL = (None, "new", "all")   # see LinearConfig.distill
TRANSFERS = (None, "mse", "ce")  # see LinearConfig.transfer
# keep_softmax_layers="auto:N" ranks layers by held-out attention-transfer MSE, "auto_kl:N"
# by the KL of the next-token distribution with only that layer linearized.
AUTO_CRITERIA = {"auto": "transfer_mse", "auto_kl": "kl"}


@dataclass
class LinearConfig(MethodConfig):
    """Fields shared by every linearized method. Recovery defaults are LoLCATs'
    (arXiv 2410.10254, sec. 4 / App. B); methods override what their paper changes."""
    softmax_every: int = 0                    # keep softmax in every n-th layer (Liger-H: 7)
    # ...or in these layer indices; "auto:N" / "auto_kl:N" (alone or with indices): the N
    # layers where linearizing hurts most, measured during recovery (methods/README.md,
    # "Hybrid layer selection"; see `auto_softmax`)
    keep_softmax_layers: tuple[int | str, ...] = ()
    backend: str = "auto"                      # kernel backend (linbench.kernels.BACKENDS)
    # init of the new parameters: "calibrated" (set from a calibration batch of the recovery
    # corpus: output norm matched to the teacher's per-head channel RMS, lolcats' window
    # weight to the teacher's attention mass in the window; linbench's default, see
    # methods/README.md "Initialization") or "paper" (the papers' constants)
    init: str = "calibrated"
    calibration_tokens: int = 8192
    # stage 1: attention transfer
    transfer: str | None = "mse"               # "mse" (outputs before o_proj) | "ce" | None
    transfer_lr: float = 1e-2
    transfer_weight: float = 1000.0            # LoLCATs: 1000 x mean-over-layers MSE
    # 0: all layers at once; K: block-wise, blocks of K decoder layers trained one after
    # another on cached teacher inputs (methods/README.md, "Block-wise transfer")
    transfer_blocks: int = 0
    # optional stage between transfer and LoRA (RADLADS' step 2, arXiv 2505.03005): the
    # student's next-token distribution pulled to the teacher's, KL end to end; None (off),
    # "new" (the method's new parameters train) or "all" (every parameter, as RADLADS)
    distill: str | None = None
    distill_lr: float = 1e-3
    # stage 2: LoRA through peft
    lora_r: int = 8                            # 0 = no LoRA stage
    adapter: str = "lora"                      # one of ADAPTERS (methods/README.md, "Adapters")
    lora_alpha: int = 16
    lora_dropout: float = 0.0
    lora_targets: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj")
    lora_lr: float = 1e-4
    max_grad_norm: float = 1.0                 # applied for real (methods/README.md, "Recovery")
    seqlen: int = 1024                         # packed training sequence length
    weight_decay: float = 0.0

    def __post_init__(self):
        """Bad values of the fields parsed here fail at construction (one line, exit 2)."""
        if isinstance(self.keep_softmax_layers, (str, int)):
            self.keep_softmax_layers = (self.keep_softmax_layers,)
        self.keep_softmax_layers = tuple(self.keep_softmax_layers)
        auto_softmax(self)
        if self.adapter not in ADAPTERS:
            raise one_of("adapter", self.adapter, ADAPTERS)
        if self.init not in INITS:
            raise one_of("init", self.init, INITS)
        if self.distill not in DISTILL:
            raise one_of("distill", self.distill, ("new", "all", "none"))
        if self.transfer not in TRANSFERS:
            raise one_of("transfer", self.transfer, ("mse", "ce", "none"))
        if not isinstance(self.transfer_blocks, int) or isinstance(self.transfer_blocks, bool) \
                or self.transfer_blocks < 0:
            raise LinbenchError(f"transfer_blocks: bad value {self.transfer_blocks!r}; valid: 0 "
                                f"(joint transfer) or K >= 1 decoder layers per block")


def auto_softmax(config) -> tuple[str, int] | None:
    """(criterion, N) of an "auto:N" / "auto_kl:N" entry in config.keep_softmax_layers, or
    None. Raises LinbenchError (one line) on anything but layer indices and one such entry."""
    found = None
    for item in config.keep_softmax_layers:
        if isinstance(item, int) and not isinstance(item, bool):
            continue
        kind, _, n = str(item).partition(":")
        n = n.strip()
        if kind not in AUTO_CRITERIA or not (n.isascii() and n.isdigit()) or found is not None:
            raise LinbenchError(
                f"keep_softmax_layers: bad entry {item!r}; valid: layer indices like 0,5, and "
                f"at most one of auto:N or auto_kl:N with N a whole number >= 0")
        found = (AUTO_CRITERIA[kind], int(n))
    return found


class LinearMethod(Method):
    config_cls = LinearConfig
    norm: ClassVar[bool] = False               # per-head RMSNorm before o_proj
    output_gate: ClassVar[bool] = False       # a new output gate before o_proj (OptionalOutputGate)

    def __init__(self, config: LinearConfig | None = None, **overrides):
        super().__init__(config, **overrides)
        # "ce" distills attention weights: only mixers that form them (`weights`) can. A
        # probe mixer of 2 heads x 64 dims: the check costs milliseconds and fails at
        # planning, not after the model is loaded and calibrated
        if self.config.transfer == "ce" and \
                not hasattr(self.build_mixer(2, 64, 128, 0, 1), "weights"):
            raise LinbenchError(f"transfer: 'ce' needs attention weights, which the {self.name} "
                                f"mixer does not form; valid for {self.name}: mse, none")

    def build_mixer(self, heads: int, head_dim: int, hidden: int, layer: int, layers: int):
        raise NotImplementedError

    def softmax_layers(self, layers: int) -> set[int]:
        """The layers linearize keeps as softmax. An "auto:N" entry adds none here: its N
        layers are chosen and reverted during recovery (linbench.recovery.select)."""
        c = self.config
        keep = {i for i in c.keep_softmax_layers if isinstance(i, int) and 0 <= i < layers}
        if c.softmax_every:
            keep |= {i for i in range(layers) if i % c.softmax_every == c.softmax_every - 1}
        auto = auto_softmax(c)
        if auto is not None and auto[1] > layers - len(keep):
            raise LinbenchError(
                f"keep_softmax_layers: {auto[1]} auto-selected layers requested but the model "
                f"has only {layers - len(keep)} linearized layers to choose from")
        return keep

    def linearize(self, model):
        from linbench.methods.linearize import swap_attention
        return swap_attention(model, self)

    def needs_recovery(self) -> bool:
        c = self.config
        return c.transfer is not None or c.distill is not None or c.lora_r > 0

    def calibrates(self) -> bool:
        """Whether `init=calibrated` has something to set: an output norm here; methods
        whose mixer calibrates its own parameters say so."""
        return self.norm

    def window(self) -> int | None:
        return 0

    def state_bytes(self, model, seqlen: int) -> int:
        from linbench.methods.linearize import state_bytes
        return state_bytes(model, self, seqlen)

    def mixer(self, heads: int, head_dim: int, backend: str = "auto"):
        from linbench.methods.linearize import MixerModule
        m = dataclasses.replace(self.config, backend=backend)
        return MixerModule(type(self)(m).build_mixer(heads, head_dim, heads * head_dim, 0, 1),
                           heads, head_dim)


class OptionalOutputGate:
    """Mixin for methods whose config has `gate: bool`, the paper's optional output gate
    (lightning, gated_deltanet): `class M(OptionalOutputGate, LinearMethod)`."""

    @property
    def output_gate(self) -> bool:
        return bool(self.config.gate)
