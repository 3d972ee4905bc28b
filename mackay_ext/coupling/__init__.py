"""Coupled channel groups from one traced forward (docs/mathematics.md §3b).

A *coupled group* is every parameter entry that exists only for one channel, neuron or attention
head: a conv filter / Linear row and its bias, that channel's norm entries, the input slice of
every consumer, the same channel of every tensor summed at a residual addition, and for attention
whole heads (q/k/v rows and the output projection's columns). Zeroing all members of a group
makes the network compute exactly what the network with the channel removed computes; `shrink`
(mackay_ext.shrink) then removes it physically.

How: the model is traced once with torch.export; every channel position of every activation
carries an *atom* label, and each ATen op relates the labels of its inputs and output (graph.py
walks the program; rules.py and layers.py hold one rule per op). Atoms that must live or die
together are merged in a union-find; a merged class is a group. Classes that cannot be removed
exactly are *blocked* and not returned: channels that reach the model output, channels fixed by an
input or a constant, and classes spanning every channel of a layer (e.g. a transformer's
embedding width, which LayerNorm statistics merge into one class: removing a zero channel there
would change the mean and variance). Groups that are exact to zero but that forward code keeps
at a fixed size (channels made by F.pad, channels indexed at fixed positions, channels a reshape
splits into a grid that removing them alone would break, as a channel shuffle does) say why in
ChannelGroup.fixed; shrink reports the ones it cannot cut for a module's sake (heads of
nn.MultiheadAttention) in ShrinkReport.kept_zero. An op the tracer does not know raises
CouplingError naming the op and its module.

A tied parameter (one Parameter under several names, e.g. an output layer reusing the embedding
table) is one tensor: members carry the name named_parameters() gives it, and a slice read by two
modules joins the channels of both uses into one group (ties.py); shrink keeps the modules tied.
A grouped convolution keeps its number of groups, whose sizes must stay equal: input position j
of every conv group goes at once (weight column j), and so does output position k (rows k,
out/groups + k, ...). A depthwise one (one input channel per conv group, any channel
multiplier) loses whole conv groups instead: input channel c with the outputs it alone makes.

Why not Torch-Pruning's DependencyGraph (evaluated, torch-pruning 1.6.1, torch 2.14.1): on the
seven test models (torchvision resnet18 and mobilenet_v2, a CIFAR ResNet with zero-padding
shortcuts, a VGG with BatchNorm, nn.TransformerEncoder, timm ViT, HF BERT) we pruned one channel
of every group it reports (output-layer groups excluded) with its own pruner and compared with the
model whose group members are zeroed. Exact: resnet18 12/12, mobilenet_v2 24/24, VGG 3/3, CIFAR
option-A 6/7 (the stem group crashes at the padded shortcut), TransformerEncoder 2/3 (the
embedding-width group crashes nn.MultiheadAttention; no head groups at all), ViT 2/5 (qkv groups
ignore heads and crash the reshape; the embedding-width group couples cls_token/pos_embed
entries), BERT 3/6 (head groups crash; the embedding-width group runs but differs by 5e-4 through
LayerNorm statistics). This tracer shrinks all seven exactly (python_tests/test_shrink.py), needs
no extra dependency, knows which groups are exact, and finds whole heads, so we use it.
"""
from .groups import ChannelGroup, Coupling, CouplingError, Member, group_index
from .trace import channel_groups, split_inputs, trace_coupling

__all__ = ["ChannelGroup", "Coupling", "CouplingError", "Member", "channel_groups", "group_index",
           "split_inputs", "trace_coupling"]
