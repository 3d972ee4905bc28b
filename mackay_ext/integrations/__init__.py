"""Adapters to the training loops and pruning tools people already use.

One module per framework, each imported only by its user (nothing here is imported by
mackay_ext itself, so the frameworks stay optional):
- torch_prune: MacKay masks to and from torch.nn.utils.prune (weight_mask buffers);
- hf: MacKayCallback, a transformers.TrainerCallback;
- lightning: MacKayPruning, a lightning.pytorch.Callback;
- _step_curvature: the pruner both callbacks build (curvature from each optimizer step's gradient).
"""
