"""The README's API example: rewrite a model with DropIT, check it, look at the report."""

import torch
import torchvision

import sparsify_fx as sfx

model = torchvision.models.resnet18()
x = torch.randn(4, 3, 64, 64)

fast = sfx.sparsify(model, [sfx.DropIT(keep=0.1), sfx.ActivationMemory()], example_inputs=(x,))
print(sfx.explain(fast))  # what was rewritten, what was skipped and why, bytes and FLOPs

optimizer = torch.optim.SGD(model.parameters(), lr=0.01)  # parameters are shared
fast.train()
loss = fast(x).logsumexp(-1).mean()
loss.backward()
optimizer.step()
print("train step ok, loss", float(loss))
