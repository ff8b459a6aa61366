"""Quickstart: the Hessian of a small torch model as a scipy LinearOperator."""

import numpy as np
import scipy.sparse.linalg as sla
import torch

import curvop

torch.manual_seed(0)
model = torch.nn.Sequential(torch.nn.Linear(10, 32), torch.nn.Tanh(), torch.nn.Linear(32, 3)).eval()
x, y = torch.randn(256, 10), torch.randint(0, 3, (256,))

H = curvop.hessian(model, torch.nn.CrossEntropyLoss(), (x, y))
print(H)

top = sla.eigsh(H, k=3, which="LA", return_eigenvectors=False)  # scipy uses the numpy path
print("top-3 eigenvalues (scipy eigsh):", np.sort(top)[::-1])

v = torch.randn(H.shape[0])
Hv = H @ v  # a torch.Tensor in, a torch.Tensor out, no host round trip
print("H @ v:", type(Hv).__name__, tuple(Hv.shape), Hv.dtype, "| products so far:", H.num_matvecs)
