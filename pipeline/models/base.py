"""The model-adapter interface: everything search, export and skipping need from an MoE family.

Search, export and skipping code only talks to a :class:`MoEAdapter`; it never branches on model
names. Families written in transformers' current style (a block with a ``gate`` router returning
``(logits, weights, indices)`` and an ``experts`` module called as ``experts(x, indices, weights)``,
experts stored as fused 3-D tensors) need only a few class attributes and a routing rule; others
override the methods that differ.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence
from typing import Any, ClassVar

import torch
from torch import nn

from pipeline.config import validate_r, validate_top_k
from pipeline.errors import PipelineError
from pipeline.models.routing import RoutingRule

#: Transform applied to a router's output: ``(weights [T,k], indices [T,k]) -> (weights, indices)``.
RouterTransform = Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


class MoEAdapter:
    """Architecture facts and operations for one MoE family. Instances are stateless."""

    #: ``config.model_type`` values this adapter serves (the registry key).
    model_types: ClassVar[tuple[str, ...]] = ()
    #: Human-readable family name for docs and errors.
    family: ClassVar[str] = ""
    #: Config key holding the number of routed experts per MoE layer.
    num_experts_key: ClassVar[str] = "num_local_experts"
    #: Config key holding the number of experts each token is routed to.
    top_k_key: ClassVar[str] = "num_experts_per_tok"
    #: Attribute of a decoder layer holding its feed-forward block (MoE or dense).
    mlp_attr: ClassVar[str] = "mlp"
    #: Attributes of the MoE block: router and routed experts.
    router_attr: ClassVar[str] = "gate"
    experts_attr: ClassVar[str] = "experts"
    #: Router tensors that hold one entry per expert (sliced with the experts on export).
    router_expert_tensors: ClassVar[tuple[str, ...]] = ("weight", "bias", "e_score_correction_bias")
    #: Tensors held by the MoE block itself (not its router) with one entry per expert (sliced on export).
    block_expert_tensors: ClassVar[tuple[str, ...]] = ()
    #: Per-expert bias added to the scores only to choose experts (DeepSeek-V3), if any: an attribute
    #: of the router, or (``block_choice_bias_attr``) of the block, which passes it to the router.
    choice_bias_attr: ClassVar[str | None] = None
    block_choice_bias_attr: ClassVar[str | None] = None
    #: Submodules of the MoE block that are shared experts (never pruned), for docs and tests.
    shared_attrs: ClassVar[tuple[str, ...]] = ()
    #: Whether the family's eager experts loop skips the sentinel index (transformers' template does;
    #: gpt-oss and Nemotron-H do not, so their dropped slots go to expert 0 with weight 0 under eager).
    eager_handles_sentinel: ClassVar[bool] = True
    #: Whether the router computes its logits in float32 whatever the model dtype (else in the
    #: input dtype, cast to float32 afterwards), so bf16 searches see the logits the model sees.
    router_fp32: ClassVar[bool] = False
    #: Where the intermediate neurons of one expert lie in each fused experts tensor (leaf name -> ``(axis,
    #: groups, interleaved)`` of the per-expert slice): ``gate_up_proj [2f, d]`` holds ``groups=2`` blocks
    #: of ``f`` neurons along axis 0 (gate rows then up rows; ``interleaved``: gate and up alternate).
    #: Merging permutes these to align experts; a tensor not listed has no neuron axis (e.g. an output bias).
    neuron_layout: ClassVar[dict[str, tuple[int, int, bool]]] = {
        "gate_up_proj": (0, 2, False),
        "up_proj": (0, 1, False),
        "down_proj": (1, 1, False),
    }
    #: Facts for the supported-families table (docs/models.md); see :meth:`describe`.
    routing_doc: ClassVar[str] = ""
    renormalized_doc: ClassVar[str] = ""
    dense_layers_doc: ClassVar[str] = "none"
    shared_doc: ClassVar[str] = ""
    notes_doc: ClassVar[str] = ""

    # -- config ----------------------------------------------------------------------------------
    def text_config(self, config: Any) -> Any:
        """The config holding the language model's settings (unwraps multimodal wrappers)."""
        getter = getattr(config, "get_text_config", None)
        return getter() if callable(getter) else config

    def num_experts(self, config: Any) -> int:
        """Routed experts per MoE layer."""
        return int(getattr(self.text_config(config), self.num_experts_key))

    def top_k(self, config: Any) -> int:
        """Experts each token is routed to."""
        return int(getattr(self.text_config(config), self.top_k_key))

    def routing_rule(self, config: Any) -> RoutingRule:
        """The rule the model with ``config`` applies to its router logits."""
        raise NotImplementedError

    def config_updates(self, config: Any, r: int) -> dict[str, Any]:
        """Keys of the (text) config to set, and their values, for a model keeping ``r`` experts."""
        return {self.num_experts_key: r}

    def top_k_updates(self, config: Any, k: int) -> dict[str, Any]:
        """Keys of the (text) config to set, and their values, for a model routing each token to ``k`` experts.

        The model's own router then picks ``k`` experts and weights them by the family's rule
        (renormalised over the ``k`` when the family renormalises); :meth:`routing_rule` reads the same key.
        """
        validate_top_k(k, self.top_k(config))
        return {self.top_k_key: k}

    def reduced_top_k_config(self, config: Any, k: int) -> Any:
        """A copy of ``config`` whose tokens are routed to ``k`` experts (static top-k reduction)."""
        new = copy.deepcopy(config)
        text = self.text_config(new)
        for key, value in self.top_k_updates(config, k).items():
            setattr(text, key, value)
        return new

    def check_r(self, config: Any, r: int) -> None:
        """Raise unless a model with ``config`` can keep ``r`` experts per MoE layer (``top_k <= r <= n``)."""
        validate_r(r, self.num_experts(config), self.top_k(config), key="r", keep_all=True)

    def pruned_config(self, config: Any, r: int) -> Any:
        """A copy of ``config`` for a model that keeps ``r`` experts per MoE layer."""
        self.check_r(config, r)
        new = copy.deepcopy(config)
        text = self.text_config(new)
        for key, value in self.config_updates(config, r).items():
            setattr(text, key, value)
        return new

    # -- structure -------------------------------------------------------------------------------
    def decoder_layers(self, model: nn.Module) -> nn.ModuleList:
        """The decoder layers, in order."""
        base = getattr(model, "model", model)
        layers = getattr(base, "layers", None)
        if layers is None and hasattr(base, "language_model"):
            layers = getattr(base.language_model, "layers", None)
        if layers is None:
            raise PipelineError(f"{type(model).__name__} has no decoder layers where the {self.family} adapter looks")
        return layers

    def moe_block(self, layer: nn.Module) -> nn.Module | None:
        """The layer's MoE block, or None for a dense layer."""
        block = getattr(layer, self.mlp_attr, None)
        if block is not None and hasattr(block, self.router_attr) and hasattr(block, self.experts_attr):
            return block
        return None

    def set_moe_block(self, layer: nn.Module, block: nn.Module) -> None:
        """Replace the layer's MoE block."""
        setattr(layer, self.mlp_attr, block)

    def moe_layer_indices(self, model: nn.Module) -> list[int]:
        """Indices of decoder layers that have an MoE block."""
        return [i for i, layer in enumerate(self.decoder_layers(model)) if self.moe_block(layer) is not None]

    def dense_layer_indices(self, model: nn.Module) -> list[int]:
        """Indices of decoder layers without an MoE block (dense feed-forward; never pruned)."""
        return [i for i, layer in enumerate(self.decoder_layers(model)) if self.moe_block(layer) is None]

    def shared_modules(self, block: nn.Module) -> dict[str, nn.Module]:
        """The block's shared experts (and their gates), by attribute name; never pruned."""
        found = {name: getattr(block, name, None) for name in self.shared_attrs}
        return {name: module for name, module in found.items() if module is not None}

    def shared_output(self, block: nn.Module, x: torch.Tensor) -> torch.Tensor | None:
        """What the shared experts add to the block's output on tokens ``x`` ``[T, d]``, or None."""
        modules = self.shared_modules(block)
        if not modules:
            return None
        out = None
        for module in modules.values():
            y = module(x)
            out = y if out is None else out + y
        return out

    def block_num_experts(self, block: nn.Module) -> int:
        """Experts currently in ``block``."""
        return int(self.router_weight(block).shape[0])

    # -- routing ---------------------------------------------------------------------------------
    def router_weight(self, block: nn.Module) -> torch.Tensor:
        """The router matrix ``[n, d]``."""
        return getattr(block, self.router_attr).weight

    def router_bias(self, block: nn.Module) -> torch.Tensor | None:
        """The router's additive logit bias ``[n]``, if any."""
        bias = getattr(getattr(block, self.router_attr), "bias", None)
        return bias if isinstance(bias, torch.Tensor) else None

    def router_logits(self, block: nn.Module, x: torch.Tensor) -> torch.Tensor:
        """Router logits ``[T, n]`` in float32 for tokens ``x`` ``[T, d]``, computed as the model does."""
        weight, bias = self.router_weight(block), self.router_bias(block)
        if self.router_fp32:
            return nn.functional.linear(x.float(), weight.float(), None if bias is None else bias.float())
        x = x.to(weight.dtype)
        return nn.functional.linear(x, weight, None if bias is None else bias.to(weight.dtype)).float()

    def choice_bias(self, block: nn.Module) -> torch.Tensor | None:
        """Per-expert selection bias ``[n]``, if the family has one."""
        if self.block_choice_bias_attr is not None:
            return getattr(block, self.block_choice_bias_attr, None)
        if self.choice_bias_attr is None:
            return None
        return getattr(getattr(block, self.router_attr), self.choice_bias_attr, None)

    def routed_output_scale(self, block: nn.Module) -> float:
        """Factor the block applies to the routed experts' sum after the router (1 for most families).

        :meth:`routing_rule` includes it, and :meth:`router_decisions` and router transforms see
        weights multiplied by it, so every weight the pipeline handles is an expert's effective
        weight in the block output.
        """
        return 1.0

    def route(
        self, block: nn.Module, logits: torch.Tensor, config: Any, kept: Sequence[int] | torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Routing weights and expert ids ``[T, k]`` when only the experts ``kept`` remain.

        ``kept`` holds expert ids of ``block`` in ascending order (None: all of them); the
        weights are those the exported model keeping exactly ``kept`` computes (each expert's
        effective weight in the block output, :meth:`routed_output_scale` included); the ids
        returned are ids of ``block`` (not positions in ``kept``). Block output =
        ``sum_j weights[:, j] * expert_outputs[:, ids[:, j]] + shared_output``.
        """
        bias = self.choice_bias(block)
        n = logits.shape[-1]
        if kept is None or len(kept) == n:
            if n < self.num_experts(config):  # a smaller layer of a per-layer-count checkpoint: its own count's rule
                config = self.pruned_config(config, n)
            rule = self.routing_rule(config)
            return rule(logits, bias)
        kept_t = torch.as_tensor(kept, dtype=torch.long, device=logits.device)
        rule = self.routing_rule(self.pruned_config(config, len(kept_t)))
        weights, local = rule(logits.index_select(-1, kept_t), None if bias is None else bias.index_select(0, kept_t))
        return weights, kept_t[local]

    def router_decisions(self, block: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The weights and expert ids ``[T, k]`` that the block's own router module produces on ``x``.

        The reference that :meth:`route` must reproduce (checked by the tests).
        """
        router = getattr(block, self.router_attr)
        if self.block_choice_bias_attr is not None:
            _logits, weights, idx = router(x, self.choice_bias(block))
        else:
            _logits, weights, idx = router(x)
        return weights.float() * self.routed_output_scale(block), idx

    def add_router_transform(self, block: nn.Module, transform: RouterTransform) -> RouterTransformHandle:
        """Apply ``transform`` to the block's routing decisions at run time; returns a removable handle.

        The router's ``(logits, weights, indices)`` output is rewritten (``transform`` sees the
        weights times :meth:`routed_output_scale`, as :meth:`route` gives them); an index equal to the
        number of experts marks a slot that the experts module does not compute and that adds
        nothing to the output. transformers' eager experts loop skips such slots; its
        ``grouped_mm`` / ``batched_mm`` kernels mask them only when the experts module's
        ``_is_expert_parallel`` flag is set, so the handle sets it until removed. Families whose
        eager loop cannot take the sentinel (``eager_handles_sentinel = False``) get, under eager,
        expert 0 with weight 0 in dropped slots: the same output, without the saving.
        """
        router = getattr(block, self.router_attr)
        experts = getattr(block, self.experts_attr, None)
        n = self.block_num_experts(block)

        scale = self.routed_output_scale(block)

        def hook(_module: nn.Module, _inputs: Any, output: Any) -> Any:
            logits, weights, idx = output
            if scale == 1.0:
                new_w, new_idx = transform(weights, idx)
            else:  # the transform sees effective weights; unchanged ones come back bit-exact
                effective = weights * scale
                new_w, new_idx = transform(effective, idx)
                new_w = torch.where(new_w == effective, weights, new_w / scale)
            if not self.eager_handles_sentinel and _experts_implementation(experts) == "eager":
                dropped = new_idx >= n
                new_w, new_idx = new_w.masked_fill(dropped, 0), new_idx.masked_fill(dropped, 0)
            return logits, new_w.to(weights.dtype), new_idx

        return RouterTransformHandle(router.register_forward_hook(hook), experts)

    # -- experts ---------------------------------------------------------------------------------
    def expert_outputs(self, block: nn.Module, x: torch.Tensor, experts: Sequence[int] | None = None) -> torch.Tensor:
        """Each listed expert's output on every token: ``[T, m, d]`` (unweighted ``E_i(x)``)."""
        module = getattr(block, self.experts_attr)
        return self.experts_forward_each(module, x, experts, self.block_num_experts(block))

    def expert_outputs_at(self, block: nn.Module, x: torch.Tensor, experts: torch.Tensor) -> torch.Tensor:
        """Output of expert ``experts[i]`` on token ``x[i]``: ``[P, d]`` for ``x [P, d]``, ``experts [P]``.

        One call of a fused experts module with one routing slot of weight 1 per row; families that
        override :meth:`expert_outputs` get one :meth:`expert_outputs` call per distinct expert.
        """
        if type(self).expert_outputs is not MoEAdapter.expert_outputs:
            out = torch.empty_like(x)
            for e in torch.unique(experts).tolist():
                rows = (experts == e).nonzero().squeeze(1)
                out[rows] = self.expert_outputs(block, x.index_select(0, rows), [e])[:, 0].to(x.dtype)
            return out
        module = getattr(block, self.experts_attr)
        ones = torch.ones((x.shape[0], 1), dtype=x.dtype, device=x.device)
        return module(x, experts.view(-1, 1).to(x.device), ones)

    @staticmethod
    def experts_forward_each(
        module: nn.Module, x: torch.Tensor, experts: Sequence[int] | None, n: int
    ) -> torch.Tensor:
        """Run a fused experts module ``module(x, ids, weights)`` once per expert with weight 1: ``[T, m, d_out]``."""
        ids = list(range(n)) if experts is None else list(experts)
        t = x.shape[0]
        ones = torch.ones((t, 1), dtype=x.dtype, device=x.device)
        outs = [module(x, torch.full((t, 1), e, dtype=torch.long, device=x.device), ones) for e in ids]
        if not outs:
            return x.new_empty((t, 0, x.shape[-1]))
        return torch.stack(outs, dim=1)

    def expert_tensors(self, block: nn.Module) -> dict[str, torch.Tensor]:
        """The routed experts' fused weight tensors by leaf name (``gate_up_proj [n, 2f, d]``, ...), expert dim first.

        Returns the parameters themselves: writing into ``tensor[e]`` changes expert ``e``. Empty
        when the experts are not stored fused (a module list).
        """
        module = getattr(block, self.experts_attr)
        n = self.block_num_experts(block)
        return {
            name: param.data
            for name, param in module.named_parameters(recurse=False)
            if param.dim() >= 1 and param.shape[0] == n
        }

    def block_output(self, block: nn.Module, x: torch.Tensor) -> torch.Tensor:
        """The block's own forward on tokens ``x`` ``[T, d]`` -> ``[T, d]``."""
        out = block(x.unsqueeze(0))
        if isinstance(out, tuple):
            out = out[0]
        return out.reshape(x.shape)

    # -- export ----------------------------------------------------------------------------------
    def expert_tensor_dim(self, name: str, tensor: torch.Tensor, n: int) -> int | None:
        """The dimension of a block state-dict entry that indexes routed experts, or None if it has none."""
        head, _, leaf = name.partition(".")
        if (
            head == self.experts_attr
            or (head == self.router_attr and leaf in self.router_expert_tensors)
            or name in self.block_expert_tensors
        ):
            if tensor.dim() >= 1 and tensor.shape[0] == n:
                return 0
        return None

    def is_expert_tensor(self, name: str, tensor: torch.Tensor, n: int) -> bool:
        """Whether a block state-dict entry holds one slice per routed expert."""
        return self.expert_tensor_dim(name, tensor, n) is not None

    def slice_expert_state(self, state: dict[str, torch.Tensor], kept: Sequence[int], n: int) -> dict[str, torch.Tensor]:
        """A block state dict keeping only experts ``kept`` (ascending ids), renumbered ``0..r-1``.

        Handles fused experts (one tensor with an expert dimension, ``expert_tensor_dim``, sliced
        along it) and experts stored as a module list (``<experts>.<j>.<param>`` entries, kept ones renumbered).
        """
        position = {int(old): new for new, old in enumerate(kept)}
        prefix = self.experts_attr + "."
        out: dict[str, torch.Tensor] = {}
        for name, t in state.items():
            if name.startswith(prefix):
                head, _, rest = name[len(prefix) :].partition(".")
                if head.isdigit() and rest:
                    if int(head) in position:
                        out[f"{prefix}{position[int(head)]}.{rest}"] = t
                    continue
            dim = self.expert_tensor_dim(name, t, n)
            if dim is None:
                out[name] = t
            else:
                out[name] = t.index_select(dim, torch.tensor(list(position), dtype=torch.long, device=t.device))
        return out

    def new_block(self, block: nn.Module, config: Any, layer_idx: int) -> nn.Module:
        """An uninitialised (meta-device) block of the same class for ``config``."""
        cls = type(block)
        with torch.device("meta"):
            try:
                return cls(self.text_config(config))
            except TypeError:
                return cls(self.text_config(config), layer_idx)

    def prune_block(self, block: nn.Module, kept: Sequence[int], pruned_config: Any, layer_idx: int) -> nn.Module:
        """A new block keeping only experts ``kept`` (ascending ids); shared parts copied unchanged."""
        n = self.block_num_experts(block)
        kept = sorted(int(k) for k in kept)
        if len(set(kept)) != len(kept) or not kept or kept[0] < 0 or kept[-1] >= n:
            raise PipelineError(f"layer {layer_idx}: kept experts {kept} are not distinct ids below {n}")
        new_state = self.slice_expert_state(block.state_dict(), kept, n)
        new = self.new_block(block, pruned_config, layer_idx)
        new.load_state_dict(new_state, strict=True, assign=True)
        self._materialise_leftovers(new, block)
        new.train(block.training)
        return new

    @staticmethod
    def _materialise_leftovers(new: nn.Module, old: nn.Module) -> None:
        """Copy non-persistent buffers (absent from state dicts) from ``old`` to ``new``."""
        old_buffers = dict(old.named_buffers())
        for name, buf in list(new.named_buffers()):
            if buf.is_meta:
                src = old_buffers.get(name)
                if src is None or src.shape != buf.shape:
                    raise PipelineError(f"cannot rebuild buffer {name} of {type(new).__name__} after pruning")
                module_name, _, leaf = name.rpartition(".")
                owner = new.get_submodule(module_name) if module_name else new
                owner.register_buffer(leaf, src.clone(), persistent=False)
        for name, param in new.named_parameters():
            if param.is_meta:
                raise PipelineError(f"parameter {name} of {type(new).__name__} was not restored after pruning")

    def adopt_pruned_config(self, model: nn.Module, pruned_config: Any, r: int) -> Any:
        """Make the model's own config describe ``r`` experts per layer, after its blocks were pruned.

        Blocks built from ``pruned_config`` are pointed back at the model's config object, which
        gets :meth:`config_updates`, so later ``set_experts_implementation`` / ``save_pretrained``
        calls see one config. Returns the model's config.
        """
        config = model.config
        pruned_text, model_text = self.text_config(pruned_config), self.text_config(config)
        updates = self.config_updates(config, r)
        for module in model.modules():
            if module.__dict__.get("config") is pruned_text:
                module.config = model_text
        for key, value in updates.items():
            setattr(model_text, key, value)
        return config

    def describe(self) -> dict[str, Any]:
        """Facts about the family, for docs (one row of the supported-families table)."""
        return {
            "family": self.family,
            "model_types": list(self.model_types),
            "num_experts_key": self.num_experts_key,
            "routing": self.routing_doc,
            "renormalized": self.renormalized_doc,
            "shared_experts": list(self.shared_attrs),
            "shared_doc": self.shared_doc,
            "dense_layers": self.dense_layers_doc,
            "notes": self.notes_doc,
        }


def _experts_implementation(experts: nn.Module | None) -> str | None:
    """The experts implementation a transformers experts module dispatches to (None if unknown)."""
    return getattr(getattr(experts, "config", None), "_experts_implementation", None)


class RouterTransformHandle:
    """Removes a router transform; the experts module's sentinel flag stays on while any transform is active."""

    _USERS = "_pipeline_router_transforms"  # active transforms on an experts module, and the flag before them

    def __init__(self, hook: Any, experts: nn.Module | None) -> None:
        self._hook = hook
        self._experts = experts if experts is not None and hasattr(experts, "_is_expert_parallel") else None
        if self._experts is not None:
            count, before = getattr(self._experts, self._USERS, (0, self._experts._is_expert_parallel))
            setattr(self._experts, self._USERS, (count + 1, before))
            self._experts._is_expert_parallel = True

    def remove(self) -> None:
        """Undo :meth:`MoEAdapter.add_router_transform` (idempotent)."""
        self._hook.remove()
        if self._experts is not None:
            count, before = getattr(self._experts, self._USERS)
            if count <= 1:
                delattr(self._experts, self._USERS)
                self._experts._is_expert_parallel = before
            else:
                setattr(self._experts, self._USERS, (count - 1, before))
            self._experts = None
