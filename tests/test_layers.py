import torch
from torch import nn

from adaptune.layers import assign_layers, find_blocks, relative_depth


def layer_names(layers):
    return list(dict.fromkeys((layer.index, layer.name, layer.kind) for layer in layers.values()))


def test_bert_blocks_embeddings_pooler_and_head():
    from transformers import BertConfig, BertForSequenceClassification

    model = BertForSequenceClassification(
        BertConfig(
            vocab_size=50,
            hidden_size=8,
            num_hidden_layers=3,
            num_attention_heads=2,
            intermediate_size=16,
            num_labels=3,
        )
    )
    layers = assign_layers(model, ["classifier.weight", "classifier.bias"])
    assert layer_names(layers) == [
        (0, "input", "input"),
        (1, "block01", "block"),
        (2, "block02", "block"),
        (3, "block03", "block"),
        (4, "output", "output"),
        (5, "head", "head"),
    ]
    assert layers["bert.embeddings.word_embeddings.weight"].kind == "input"
    assert layers["bert.encoder.layer.2.output.dense.weight"].module == "bert.encoder.layer.2"
    assert layers["bert.pooler.dense.weight"].kind == "output"
    depth = relative_depth(layers)
    assert depth["bert.embeddings.word_embeddings.weight"] == 0 and depth["classifier.bias"] == 1


def test_other_transformers_without_bert_names():
    from transformers import (
        DistilBertConfig,
        DistilBertForSequenceClassification,
        GPT2Config,
        GPT2ForSequenceClassification,
    )

    distil = DistilBertForSequenceClassification(
        DistilBertConfig(vocab_size=50, dim=8, n_layers=2, n_heads=2, hidden_dim=16, num_labels=2)
    )
    assert find_blocks(distil) == [
        "distilbert.transformer.layer.0",
        "distilbert.transformer.layer.1",
    ]
    gpt = GPT2ForSequenceClassification(GPT2Config(vocab_size=50, n_embd=8, n_layer=3, n_head=2))
    layers = assign_layers(gpt, ["score.weight"])
    assert (
        next(layer.module for layer in layers.values() if layer.kind == "block")
        == "transformer.h.0"
    )
    assert layers["transformer.ln_f.weight"].kind == "output"


def test_resnet_blocks_across_stages():
    from torchvision.models import resnet18

    layers = assign_layers(resnet18(num_classes=4), ["fc.weight", "fc.bias"])
    blocks = list(dict.fromkeys(layer.module for layer in layers.values() if layer.kind == "block"))
    assert blocks == [f"layer{s}.{b}" for s in range(1, 5) for b in range(2)]
    assert layers["conv1.weight"].kind == "input" and layers["bn1.bias"].kind == "input"
    assert layers["fc.weight"].index == 9


def test_nested_stage_containers_are_flattened():
    def block():
        return nn.Sequential(nn.Conv2d(2, 2, 1), nn.BatchNorm2d(2))

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.stem = nn.Conv2d(3, 2, 1)
            self.blocks = nn.Sequential(nn.Sequential(Block()), nn.Sequential(Block(), Block()))
            self.fc = nn.Linear(2, 3)

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.body = block()

    layers = assign_layers(Net(), ["fc.weight", "fc.bias"])
    assert [layer.module for layer in dict.fromkeys(layers.values()) if layer.kind == "block"] == [
        "blocks.0.0",
        "blocks.1.0",
        "blocks.1.1",
    ]


def test_module_tree_fallback_for_unknown_designs():
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.LayerNorm(8), nn.Linear(8, 3))
    layers = assign_layers(model, ["3.weight", "3.bias"])
    assert layer_names(layers) == [(0, "0", "block"), (1, "2", "block"), (2, "head", "head")]
    assert torch.tensor([layer.index for layer in layers.values()]).max() == 2


def test_roberta_and_vit_from_their_own_module_trees():
    from transformers import (
        RobertaConfig,
        RobertaForSequenceClassification,
        ViTConfig,
        ViTForImageClassification,
    )

    roberta = RobertaForSequenceClassification(
        RobertaConfig(
            vocab_size=60,
            hidden_size=8,
            num_hidden_layers=2,
            num_attention_heads=2,
            intermediate_size=16,
            num_labels=3,
        )
    )
    head = [n for n, _ in roberta.named_parameters() if n.startswith("classifier")]
    layers = assign_layers(roberta, head)
    assert layer_names(layers)[1:3] == [(1, "block01", "block"), (2, "block02", "block")]
    assert {layers[n].kind for n in head} == {"head"}  # RoBERTa's two-layer head stays whole
    vit = ViTForImageClassification(
        ViTConfig(
            hidden_size=8,
            num_hidden_layers=3,
            num_attention_heads=2,
            intermediate_size=16,
            image_size=16,
            patch_size=8,
            num_labels=4,
        )
    )
    layers = assign_layers(vit, ["classifier.weight", "classifier.bias"])
    assert layers["vit.embeddings.patch_embeddings.projection.weight"].kind == "input"
    names = list(layers)  # registration order: ..., last block, final norm, head
    assert layers[names[-5]].name == "block03" and layers[names[-3]].kind == "output"
    assert [layers[n].kind for n in names[-2:]] == ["head", "head"]
