"""LoRA (Hu et al. 2021), rsLoRA (Kalajdzievski 2023), DoRA (Liu et al. 2024) and QLoRA (Dettmers et al. 2023).

An adapted linear layer computes

    LoRA:  y = W x + b + s B A x~                       (Hu et al., eq. 3), x~ = dropout(x)
    DoRA:  y = (m / ||W + s B A||_c) (W + s B A) x + b   (Liu et al., eq. 5)

with A [r, in], B [out, r], s = alpha / r (rsLoRA: alpha / sqrt(r)), m [out] a learned magnitude and
||.||_c the norm of each output row of the [out, in] matrix (PEFT's "column norm", the paper's column of
W^T), treated as a constant in backward (Liu et al., sec. 4.3).

`LoRALinear` replaces an nn.Linear but keeps its `weight` and `bias` parameters under the same names, so
`model.state_dict()` still has `...q_proj.weight` (torchtune's choice); the adapter adds `lora_a.weight`,
`lora_b.weight` and, for DoRA, `lora_magnitude`.
"""

from __future__ import annotations

import contextlib
import math
import re
from collections import Counter
from dataclasses import dataclass, field, replace
from typing import Iterator

import torch
import torch.nn.functional as F
from torch import nn

from tunelab.peft import qlora

ALL_LINEAR = "all-linear"
ADAPTER_SUFFIXES = (".lora_a.weight", ".lora_b.weight", ".lora_magnitude")


@dataclass
class LoraSettings:
    """How to adapt a model. target_modules: our module names (the last path component, e.g. "q_proj"),
    regexes matched against the full module path, or "all-linear" (every nn.Linear in the backbone)."""

    r: int = 8
    alpha: float = 16
    dropout: float = 0.0
    target_modules: list[str] = field(default_factory=lambda: ["q_proj", "v_proj"])
    rslora: bool = False  # s = alpha / sqrt(r) instead of alpha / r
    dora: bool = False  # weight-decomposed LoRA
    quantize_base: bool = False  # QLoRA: frozen base weights of the adapted layers in NF4
    modules_to_save: list[str] = field(default_factory=list)  # trained fully and saved with the adapter

    def __post_init__(self) -> None:
        if isinstance(self.target_modules, str):
            self.target_modules = [self.target_modules]
        if isinstance(self.modules_to_save, str):
            self.modules_to_save = [self.modules_to_save]
        if isinstance(self.r, bool) or not isinstance(self.r, int) or self.r <= 0:
            raise ValueError(f"LoRA rank r must be a positive integer, got {self.r!r}")
        if not self.alpha > 0:
            raise ValueError(f"LoRA alpha must be positive, got {self.alpha!r}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"LoRA dropout must be in [0, 1), got {self.dropout!r}")
        if not self.target_modules:
            raise ValueError("target_modules is empty: name at least one module to adapt")


def lora_scaling(r: int, alpha: float, rslora: bool) -> float:
    """s = alpha / r (Hu et al. 2021, sec. 4.1), or alpha / sqrt(r) (rsLoRA, Kalajdzievski 2023, thm. 3.2)."""
    return alpha / math.sqrt(r) if rslora else alpha / r


class LoRALinear(nn.Module):
    """A frozen linear layer W x + b with a trainable low-rank update (see the module docstring).

    Built from an nn.Linear whose `weight` and `bias` parameter objects it takes over unchanged (or, with
    quantize_base, replaces the weight by its NF4 form under the same name).
    """

    def __init__(
        self,
        base: nn.Linear,
        r: int,
        alpha: float,
        *,
        dropout: float = 0.0,
        rslora: bool = False,
        dora: bool = False,
        quantize_base: bool = False,
        name: str = "",
    ) -> None:
        super().__init__()
        if r <= 0:
            raise ValueError(f"LoRA rank r must be positive, got {r}")
        self.in_features, self.out_features = base.in_features, base.out_features
        self.r, self.alpha, self.rslora, self.dora = r, alpha, rslora, dora
        self.scaling = lora_scaling(r, alpha, rslora)
        self.dropout_p = dropout
        base.weight.requires_grad_(False)
        if base.bias is not None:
            base.bias.requires_grad_(False)
        if quantize_base:
            self.weight = nn.Parameter(qlora.to_nf4(base.weight, name=f"{name}.weight"), requires_grad=False)
        else:
            self.weight = base.weight  # the same Parameter: the state-dict name and storage are unchanged
        self.register_parameter("bias", base.bias)
        dtype, device = self.weight.dtype, self.weight.device
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.lora_a = nn.Linear(self.in_features, r, bias=False, device=device, dtype=dtype)
        self.lora_b = nn.Linear(r, self.out_features, bias=False, device=device, dtype=dtype)
        if dora:
            self.lora_magnitude = nn.Parameter(torch.empty(self.out_features, device=device, dtype=dtype))
        self.merged = False
        self.active = True
        self._unmerged_weight: nn.Parameter | None = None  # the base weight kept while merged (DoRA, NF4)
        self.reset_lora_parameters()

    @property
    def quantized(self) -> bool:
        return qlora.is_nf4(self.weight)

    @torch.no_grad()
    def reset_lora_parameters(self) -> None:
        """A ~ kaiming-uniform (as nn.Linear and PEFT), B = 0 so that the adapted layer starts as W; m = ||W||_c."""
        nn.init.kaiming_uniform_(self.lora_a.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_b.weight)
        if self.dora:
            weight = self.dense_weight(torch.promote_types(self.weight.dtype, torch.float32))
            self.lora_magnitude.copy_(self._weight_norm(weight).to(self.lora_magnitude.dtype))

    def dense_weight(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The base weight W [out, in] as a dense tensor (dequantised if NF4)."""
        return qlora.dequantize(self.weight, dtype)

    def delta_weight(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """s B A [out, in]."""
        dtype = dtype or self.lora_a.weight.dtype
        return self.scaling * (self.lora_b.weight.to(dtype) @ self.lora_a.weight.to(dtype))

    def _weight_norm(self, weight: torch.Tensor) -> torch.Tensor:
        """||W + s B A||_c [out]: the L2 norm of each output row, without gradient (Liu et al. 2024, sec. 4.3)."""
        with torch.no_grad():
            return torch.linalg.norm(weight + self.delta_weight(weight.dtype), dim=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [..., in] -> [..., out]."""
        if self.merged or not self.active:
            return qlora.linear(x, self.weight, self.bias)
        x_drop = self.dropout(x)
        lora = self.lora_b(self.lora_a(x_drop)) * self.scaling  # s B A x~  [..., out]
        if not self.dora:
            return qlora.linear(x, self.weight, self.bias) + lora  # W x + b + s B A x~
        weight = self.dense_weight(x.dtype)
        g = self.lora_magnitude.to(x.dtype) / self._weight_norm(weight)  # m / ||W + s B A||_c  [out]
        wx = F.linear(x, weight)  # W x
        if self.training and self.dropout_p > 0:
            # Dropout acts on the adapter path only, as in PEFT: y = W x + (g - 1) W x~ + g s B A x~ + b
            y = wx + (g - 1) * F.linear(x_drop, weight) + g * lora
        else:
            y = g * (wx + lora)  # (m / ||W + s B A||_c) (W + s B A) x
        return y if self.bias is None else y + self.bias

    @torch.no_grad()
    def merge(self) -> None:
        """Fold the adapter into the weight: W <- W + s B A (LoRA), W <- m (W + s B A) / ||W + s B A||_c (DoRA).

        LoRA on a dense weight is undone by subtraction; DoRA and NF4 weights keep the original to restore.
        An NF4 weight becomes a dense one in its original dtype: a merged QLoRA model is a normal model.
        """
        if self.merged:
            return
        dtype = torch.promote_types(self.weight.dtype, torch.float32)  # bf16/fp16 weights merge in fp32
        weight = self.dense_weight(dtype)
        merged = weight + self.delta_weight(dtype)
        if self.dora:
            merged = (self.lora_magnitude.to(dtype) / torch.linalg.norm(merged, dim=1))[:, None] * merged
        if self.dora or self.quantized:
            self._unmerged_weight = self.weight
            self.weight = nn.Parameter(merged.to(self.weight.dtype), requires_grad=False)
        else:
            self.weight.copy_(merged.to(self.weight.dtype))
        self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        """Undo merge(): W <- W - s B A, or the kept original weight back."""
        if not self.merged:
            return
        if self._unmerged_weight is not None:
            self.weight, self._unmerged_weight = self._unmerged_weight, None
        else:
            dtype = torch.promote_types(self.weight.dtype, torch.float32)
            self.weight.copy_((self.weight.to(dtype) - self.delta_weight(dtype)).to(self.weight.dtype))
        self.merged = False

    def to_linear(self) -> nn.Linear:
        """A plain nn.Linear with the merged weight (dense) and the same bias: the adapter folded in for good."""
        self.merge()
        weight = self.dense_weight()
        linear = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None, device="meta")
        linear.weight = weight if isinstance(weight, nn.Parameter) else nn.Parameter(weight, requires_grad=False)
        linear.bias = self.bias
        return linear

    def extra_repr(self) -> str:
        kind = "DoRA" if self.dora else "LoRA"
        nf4 = ", base=NF4" if self.quantized else ""
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
            f"{kind} r={self.r}, alpha={self.alpha}, scaling={self.scaling:g}{nf4}, merged={self.merged}"
        )


# ---------------------------------------------------------------------------------------------
# Applying LoRA to a model


def lora_modules(model: nn.Module) -> dict[str, LoRALinear]:
    """Every adapted layer of the model by its module path."""
    return {name: m for name, m in model.named_modules() if isinstance(m, LoRALinear)}


def cast_frozen_base(model: nn.Module, dtype: torch.dtype) -> int:
    """The frozen base weights (and biases) of every adapted layer in `dtype`, the adapters unchanged; returns
    the bytes freed.

    For training under autocast to `dtype`: every matmul casts its fp32 weight to bf16 or fp16 anyway, so the
    forward and backward passes compute the same numbers, while the base takes half the memory and no cast
    copy of every weight is made each step. A layer called outside autocast casts the base to its input's
    dtype (qlora.linear). NF4 bases (QLoRA) are left as they are, and so are DoRA's: its column norms
    ||W + s B A|| are taken from the full-precision weight."""
    freed = 0
    for layer in lora_modules(model).values():
        if layer.dora:
            continue
        for name in ("weight", "bias"):
            tensor = getattr(layer, name)
            if (tensor is None or tensor.requires_grad or qlora.is_nf4(tensor) or tensor.dtype == dtype
                    or not tensor.is_floating_point()):
                continue
            low = tensor.detach().to(dtype)
            freed += tensor.numel() * tensor.element_size() - low.numel() * low.element_size()
            setattr(layer, name, nn.Parameter(low, requires_grad=False))
    return freed


def _linear_modules(model: nn.Module, exclude: list[str]) -> dict[str, nn.Linear]:
    """nn.Linear modules by path, outside the subtrees in `exclude`."""
    return {
        name: m
        for name, m in model.named_modules()
        if isinstance(m, nn.Linear) and not any(name == e or name.startswith(e + ".") for e in exclude)
    }


def _describe_names(names: list[str]) -> str:
    short = sorted({n.rsplit(".", 1)[-1] for n in names})
    example = next(iter(sorted(names)), "")
    return f"linear modules are named {', '.join(short)} (full paths such as {example!r} match as regexes)"


def resolve_targets(model: nn.Module, target_modules: list[str], exclude: list[str] = ()) -> list[str]:
    """Paths of the nn.Linear modules that `target_modules` selects; ValueError naming a pattern that selects none."""
    linears = _linear_modules(model, list(exclude))
    backbone = [n for n in linears if n.startswith("backbone.")] if hasattr(model, "backbone") else list(linears)
    chosen: set[str] = set()
    for pattern in target_modules:
        if pattern == ALL_LINEAR:
            found = backbone
        else:
            try:
                regex = re.compile(pattern)
            except re.error as e:
                raise ValueError(f"target module {pattern!r} is neither a module name nor a valid regex: {e}") from None
            found = [n for n in linears if n.rsplit(".", 1)[-1] == pattern or regex.fullmatch(n)]
        if not found:
            raise ValueError(
                f"target module {pattern!r} matches no nn.Linear in the model; {_describe_names(list(linears))}"
            )
        chosen.update(found)
    return sorted(chosen, key=list(linears).index)


def resolve_modules_to_save(model: nn.Module, names: list[str]) -> list[str]:
    """Full module paths for modules_to_save entries (a full path, or a path suffix such as "classifier")."""
    paths = [n for n, _ in model.named_modules() if n]
    resolved: list[str] = []
    for name in names:
        found = [p for p in paths if p == name or p.endswith("." + name)]
        found = [p for p in found if not any(p.startswith(q + ".") for q in found)]  # outermost only
        if not found:
            heads = ", ".join(f"heads.{h}" for h in getattr(model, "heads", {}))
            raise ValueError(
                f"modules_to_save entry {name!r} matches no module of the model (heads: {heads or 'none'})"
            )
        resolved += [p for p in found if p not in resolved]
    return resolved


def _tied_parameters(model: nn.Module) -> set[int]:
    counts = Counter(id(p) for _, p in model.named_parameters(remove_duplicate=False))
    return {pid for pid, n in counts.items() if n > 1}


def apply_lora(
    model: nn.Module, settings: LoraSettings, *, ranks: dict[str, tuple[int, float]] | None = None
) -> nn.Module:
    """Adapt the target layers in place and freeze every other parameter except modules_to_save; returns model.

    ranks: optional {module path: (r, alpha)} overriding settings.r / settings.alpha per layer (PEFT's
    rank_pattern / alpha_pattern); when given, exactly these modules are adapted.
    """
    if lora_modules(model):
        raise ValueError("the model already has LoRA adapters; unload_lora(model) before applying new ones")
    save = resolve_modules_to_save(model, settings.modules_to_save)
    targets = list(ranks) if ranks is not None else resolve_targets(model, settings.target_modules, save)
    tied = _tied_parameters(model)
    for path in targets:
        module = model.get_submodule(path)
        if not isinstance(module, nn.Linear):
            raise ValueError(f"{path} is a {type(module).__name__}, not an nn.Linear; LoRA adapts linear layers only")
        if id(module.weight) in tied:
            raise ValueError(f"{path}.weight is tied to another module's weight; LoRA on tied weights is not supported")
    for p in model.parameters():
        p.requires_grad_(False)
    for path in targets:
        r, alpha = ranks[path] if ranks is not None else (settings.r, settings.alpha)
        parent_path, _, child = path.rpartition(".")
        parent = model.get_submodule(parent_path) if parent_path else model
        adapted = LoRALinear(
            parent.get_submodule(child),
            r,
            alpha,
            dropout=settings.dropout,
            rslora=settings.rslora,
            dora=settings.dora,
            quantize_base=settings.quantize_base,
            name=path,
        )
        adapted.train(parent.training)
        setattr(parent, child, adapted)
    for path in save:
        model.get_submodule(path).requires_grad_(True)
    model.lora_settings = replace(settings, modules_to_save=save)
    return model


def merge_lora(model: nn.Module) -> None:
    """Fold every adapter into its base weight (forward then costs what the base model costs)."""
    for module in lora_modules(model).values():
        module.merge()


def unmerge_lora(model: nn.Module) -> None:
    """Undo merge_lora: the base weights back as they were (an NF4 base is restored as NF4)."""
    for module in lora_modules(model).values():
        module.unmerge()


def unload_lora(model: nn.Module) -> nn.Module:
    """Merge every adapter and put plain nn.Linear layers back: a normal model that write_hf_model saves.

    A QLoRA model comes back dense (dequantised base + update, in the base's original dtype). Parameters
    keep their requires_grad flags.
    """
    for path, module in lora_modules(model).items():
        parent_path, _, child = path.rpartition(".")
        parent = model.get_submodule(parent_path) if parent_path else model
        setattr(parent, child, module.to_linear())
    if hasattr(model, "lora_settings"):
        del model.lora_settings
    return model


@contextlib.contextmanager
def lora_disabled(model: nn.Module) -> Iterator[nn.Module]:
    """Run the base model with every adapter switched off (e.g. DPO's reference model without a copy).

    modules_to_save stay as trained: there is no untrained copy of them.
    """
    modules = lora_modules(model).values()
    if any(m.merged for m in modules):
        raise RuntimeError("cannot disable merged adapters; unmerge_lora(model) first")
    previous = [m.active for m in modules]
    for m in modules:
        m.active = False
    try:
        yield model
    finally:
        for m, was in zip(modules, previous):
            m.active = was


def lora_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """Only the adapter tensors (lora_a, lora_b, lora_magnitude) and modules_to_save, under our names."""
    settings = getattr(model, "lora_settings", None)
    save = settings.modules_to_save if settings is not None else []
    return {
        name: tensor
        for name, tensor in model.state_dict().items()
        if name.endswith(ADAPTER_SUFFIXES) or any(name.startswith(m + ".") for m in save)
    }
