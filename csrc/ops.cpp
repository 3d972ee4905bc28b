// Operator schemas of mackay_ext (defined once; each device file registers its kernels).
#include <torch/library.h>

TORCH_LIBRARY(mackay_ext, m) {
  m.def(
      "mackay_update_(Tensor(a!) weight, Tensor curvature, Tensor(b!) alpha, *, float num_data, "
      "str rule='mackay', str prune='alpha', float? threshold=None, float eps=1e-16, "
      "float alpha_min=0., float? alpha_max=None) -> (Tensor gamma_sum, Tensor num_pruned)");
  // One fused MacKay-Adam step over a list of parameters of one device and dtype. The first
  // len(alphas) params carry ARD state (alpha, and curvature when `curvatures` is non-empty);
  // the rest take plain Adam in the same pass. Steps (float32 scalars on the params' device)
  // are incremented by the op, unless found_inf is set: then nothing changes at all.
  m.def(
      "mackay_adam_step_(Tensor(a!)[] params, Tensor[] grads, Tensor(b!)[] exp_avgs, "
      "Tensor(c!)[] exp_avg_sqs, Tensor(d!)[] steps, Tensor(e!)[] curvatures, Tensor[] alphas, *, "
      "float lr, float beta1, float beta2, float eps, float weight_decay, "
      "bool decoupled_weight_decay, float num_data, float batch_size, float curvature_decay, "
      "Tensor? grad_scale=None, Tensor? found_inf=None) -> ()");
  // The ARD prior's proximal step after a step of a torch Adam/AdamW/NAdam, in place (float32):
  // w <- w d / (d + scale alpha), d = sqrt(v / (1 - beta2^max(step, 1)) + tiny) + eps, v Adam's
  // exp_avg_sq, scale = lr / N; w <- 0 where alpha = +inf; nothing at all where found_inf != 0.
  // alpha broadcasts to the weight (one per weight or per group).
  m.def("adam_proximal_prior_(Tensor(a!) weight, Tensor exp_avg_sq, Tensor alpha, Tensor step, *, "
        "float beta2, float eps, float scale, Tensor? found_inf=None) -> ()");
  // Masked sparse matmul, W (out x in) in CSR: y = x W^T over x's last dimension.
  m.def("csr_matmul(Tensor x, Tensor crow_indices, Tensor col_indices, Tensor values, "
        "int in_features) -> Tensor");
  // Gradient of W's stored values: grad_values[k] = sum_b grad_out[b, row(k)] x[b, col(k)].
  m.def("csr_sddmm(Tensor grad_out, Tensor x, Tensor crow_indices, Tensor col_indices, "
        "int in_features) -> Tensor");
  // y = x W^T + b. (crow_t, row_t, perm_t) index W^T (built once per layer) for the backward:
  // grad_x = grad W by csr_matmul on W^T, grad_values by csr_sddmm.
  m.def("csr_linear(Tensor x, Tensor crow_indices, Tensor col_indices, Tensor values, Tensor? bias, "
        "Tensor crow_t, Tensor row_t, Tensor perm_t) -> Tensor");
  // Exact diagonal empirical Fisher of a Linear layer: out += scale * (a*a)^T (b*b), squares
  // formed on load (a: output gradients [N, out], b: inputs [N, in], out: [out, in]). bias_out,
  // when given, gets the bias's share from the same squares of a: bias_out[o] += scale * sum_n a[n, o]^2.
  m.def("sq_gemm_accumulate_(Tensor(a!) out, Tensor a, Tensor b, float scale, Tensor(b!)? bias_out=None) -> ()");
  // The same at the nonzeros of a pattern over out only (the weights still alive); the rest of
  // out is left as it is. The pattern comes in column blocks: col_splits [B + 1] (0 = c_0 <= ...
  // <= c_B = in) cut out's columns into B blocks, and block_crow [B * out + 1] is a CSR over
  // virtual rows j * out + o, row o's nonzeros within block j (col_indices [nnz] their columns).
  // B = 1, col_splits = [0, in], is a plain CSR. bias_out, when given, gets the bias's share,
  // bias_out[o] += scale * sum_n a[n, o]^2. CPU kernel only: CUDA tensors keep the dense product
  // above (no sparse kernel yet).
  m.def("sq_sddmm_accumulate_(Tensor(a!) out, Tensor a, Tensor b, Tensor col_splits, Tensor block_crow, "
        "Tensor col_indices, float scale, Tensor(b!)? bias_out=None) -> ()");
  // The same for a Conv2d: out [O, C/groups * kh * kw] += scale * sum_n G_n^2, G_n the gradient of
  // example n's weight (input [N, C, H, W], grad_output [N, O, H', W']). CPU kernel only; CUDA
  // tensors take the Python route (per-example gradients by the convolution library).
  // grad_sum, when given, gets the batch's weight gradient sum_n G_n added (unscaled) from the
  // same products: a training step then needs no weight gradient of its own for the layer.
  m.def("conv_sq_grad_accumulate_(Tensor(a!) out, Tensor input, Tensor grad_output, int[2] kernel_size, "
        "int[2] stride, int[2] padding, int[2] dilation, int groups, float scale, "
        "Tensor(b!)? grad_sum=None) -> ()");
}
