"""Peers of MacKay ARD, trained in the same harness as the MacKay rows (bench/pareto_mnist.py):
the same split, the same ±2 pixel shifts, the same dense network to start from and the same
epoch budget after it. They are baselines written from their papers, not product:

- gmp: gradual magnitude pruning (Zhu and Gupta 2017), global magnitude, cubic schedule;
- sparse_vd: sparse variational dropout (Molchanov, Ashukha and Vetrov 2017), additive noise
  reparameterisation, weights with log alpha above a threshold (3) pruned;
- l0: L0 regularisation with hard-concrete gates (Louizos, Welling and Kingma 2018) on the
  units MacKay's group recipes put one alpha on (input neurons of a Linear, conv filters), the
  structured peer.
common holds what they share: the training loop, masks, and the counts (weights kept, MACs of
the network with its dead units removed).
"""
