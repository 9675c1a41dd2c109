"""Layer discovery: which layer of the network each parameter tensor belongs to.

Found from the module tree, never from parameter-name patterns of one architecture:

1. **Blocks** are the children of *repeated-block containers*: an ``nn.ModuleList`` or
   ``nn.Sequential`` with at least two parameter-bearing children of one class (BERT's
   ``encoder.layer``, GPT-2's ``h``, ViT's ``blocks``, each stage ``layer1``..``layer4`` of a
   ResNet). A container whose children are themselves plain containers (timm's EfficientNet
   ``blocks`` of stages) is flattened, so its inner blocks count. Containers inside a block, or
   holding only the head, are ignored.
2. Parameters registered before the first block form the ``input`` layer (embeddings, a CNN's
   stem); those after the last block, but not in the head, form the ``output`` layer (pooler,
   final norm); the task's new parameters form the ``head``. A parameter between blocks joins the
   block before it.
3. With no repeated blocks (a small MLP, an unknown design), each top-level child of the model's
   trunk is a layer, in registration order: the module-tree fallback.

Layer indices follow the forward order: ``input`` 0, blocks 1..n, ``output`` n+1, ``head`` last.

Each tensor also has a *category* (:func:`tensor_categories`), from the module that holds it:
``norm`` (a normalisation layer), ``attention`` (inside an attention module), ``other``
(feed-forward layers, convolutions, embeddings).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from torch import nn

INPUT, BLOCK, OUTPUT, HEAD = "input", "block", "output", "head"
NORM, ATTENTION, OTHER = "norm", "attention", "other"


@dataclass(frozen=True)
class Layer:
    """One layer of the network: ``index`` in forward order, a short ``name`` for tables and
    plots, its ``kind`` (input, block, output, head) and the ``module`` path it comes from."""

    index: int
    name: str
    kind: str
    module: str


def _has_parameters(module: nn.Module) -> bool:
    return any(True for _ in module.parameters())


def _is_plain_container(module: nn.Module) -> bool:
    return type(module) in (nn.ModuleList, nn.Sequential)


def _blocks_of(prefix: str, container: nn.Module) -> list[str]:
    """Module paths of the blocks in a repeated-block container, flattening nested plain
    containers."""
    blocks: list[str] = []
    for child_name, child in container.named_children():
        if not _has_parameters(child):
            continue
        path = f"{prefix}.{child_name}" if prefix else child_name
        if _is_plain_container(child):
            blocks.extend(_blocks_of(path, child))
        else:
            blocks.append(path)
    return blocks


def find_blocks(model: nn.Module, head: Iterable[str] = ()) -> list[str]:
    """Module paths of the model's repeated blocks, in registration order."""
    head = set(head)
    blocks: list[str] = []
    containers: list[str] = []
    for name, module in model.named_modules():
        if not isinstance(module, nn.ModuleList | nn.Sequential) or not name:
            continue
        if any(name.startswith(c + ".") for c in containers):
            continue  # inside a container already taken (and so inside one of its blocks)
        children = [c for c in module.children() if _has_parameters(c)]
        if len(children) < 2 or len({type(c) for c in children}) != 1:
            continue
        params = [f"{name}.{n}" for n, _ in module.named_parameters()]
        if all(p in head for p in params):
            continue
        containers.append(name)
        blocks.extend(_blocks_of(name, module))
    return blocks


def _trunk_children(model: nn.Module, head: set[str]) -> list[str]:
    """Top-level children of the model's trunk: descend through wrappers that hold all the
    non-head parameters in a single child (``BertForSequenceClassification.bert``)."""
    prefix, module = "", model
    while True:
        children = [
            (n, c)
            for n, c in module.named_children()
            if any(f"{prefix}{n}.{p}" not in head for p, _ in c.named_parameters())
        ]
        if len(children) == 1 and list(children[0][1].children()):
            name, module = children[0]
            prefix = f"{prefix}{name}."
            continue
        return [f"{prefix}{n}" for n, _ in children]


def _owner(parameter: str, modules: list[str]) -> str | None:
    for module in modules:
        if parameter.startswith(module + "."):
            return module
    return None


def assign_layers(model: nn.Module, head: Iterable[str]) -> dict[str, Layer]:
    """Map every parameter name of ``model`` to its :class:`Layer`."""
    head = set(head)
    names = [n for n, _ in model.named_parameters()]
    blocks = find_blocks(model, head)
    groups = blocks or _trunk_children(model, head)

    owner: dict[str, str | None] = {n: _owner(n, groups) for n in names if n not in head}
    first_group = next((i for i, n in enumerate(names) if owner.get(n)), None)
    last_group = max((i for i, n in enumerate(names) if owner.get(n)), default=None)

    layer_of_group = {
        group: Layer(i + 1, f"block{i + 1:02d}" if blocks else group, BLOCK, group)
        for i, group in enumerate(groups)
    }
    input_layer = Layer(0, INPUT, INPUT, "")
    output_layer = Layer(len(groups) + 1, OUTPUT, OUTPUT, "")
    head_layer = Layer(len(groups) + 2, HEAD, HEAD, "")

    layers: dict[str, Layer] = {}
    previous: Layer | None = None
    for position, name in enumerate(names):
        if name in head:
            layers[name] = head_layer
            continue
        group = owner[name]
        if group is not None:
            layer = layer_of_group[group]
        elif first_group is None or position < first_group:
            layer = input_layer
        elif last_group is not None and position > last_group:
            layer = output_layer
        else:
            layer = previous or input_layer  # between blocks: joins the block before it
        layers[name] = layer
        previous = layer
    return _renumber(layers)


def _renumber(layers: dict[str, Layer]) -> dict[str, Layer]:
    """Close gaps in the indices (a model with no input or output layer) and name modules."""
    present = sorted({layer.index for layer in layers.values()})
    new_index = {old: new for new, old in enumerate(present)}
    return {
        name: Layer(new_index[layer.index], layer.name, layer.kind, layer.module)
        for name, layer in layers.items()
    }


def relative_depth(layers: dict[str, Layer]) -> dict[str, float]:
    """Position of each parameter's layer in the network, 0 (input) to 1 (head)."""
    deepest = max(layer.index for layer in layers.values()) or 1
    return {name: layer.index / deepest for name, layer in layers.items()}


def _is_norm(module: nn.Module) -> bool:
    """A normalisation layer: torch's (LayerNorm, GroupNorm, BatchNorm and InstanceNorm, and
    their subclasses, such as timm's BatchNormAct2d) or a class named like one (LlamaRMSNorm,
    T5LayerNorm)."""
    norms = (nn.LayerNorm, nn.GroupNorm, nn.modules.batchnorm._NormBase, nn.RMSNorm)
    return isinstance(module, norms) or type(module).__name__.lower().endswith("norm")


def tensor_categories(model: nn.Module) -> dict[str, str]:
    """Each parameter's category, from the module tree: ``norm`` when the module holding it is
    a normalisation layer; ``attention`` when that module is inside (or is) a module whose class
    name contains "Attention" (BERT's self-attention and its output projection, GPT-2's
    ``c_attn``/``c_proj``, ViT's ``qkv``/``proj``); ``other`` for the rest (feed-forward
    layers, convolutions, embeddings)."""
    modules = dict(model.named_modules())
    attention = [
        name for name, m in modules.items() if name and "attention" in type(m).__name__.lower()
    ]
    categories = {}
    for name, _ in model.named_parameters():
        owner = name.rpartition(".")[0]
        if _is_norm(modules[owner]):
            categories[name] = NORM
        elif any(owner == a or owner.startswith(a + ".") for a in attention):
            categories[name] = ATTENTION
        else:
            categories[name] = OTHER
    return categories


def output_dim(module: nn.Module) -> int:
    """The dimension of ``module``'s weight that indexes its outputs: 0 as ``nn.Linear`` and
    convolutions store them (outputs x inputs), 1 for transformers' ``Conv1D`` (GPT-2's
    projections), which stores its weight as inputs x outputs."""
    return 1 if type(module).__name__ == "Conv1D" else 0
