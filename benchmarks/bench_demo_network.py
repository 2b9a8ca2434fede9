"""Cost of one training iteration (forward + backward + SGD step) of nnU-Net's PlainConvUNet on the CPU,
for the CCTA phantom's 3d_fullres plan and for the small-patch configurations considered for the demo.

Why: the demo's budget is counted in iterations; this shows how many fit into a few CPU minutes.
Random input, deep supervision on, 2 torch threads, best of 3 timed iterations after one warm-up.
Run: .venv/bin/python benchmarks/bench_demo_network.py
"""
import time

import torch
from dynamic_network_architectures.architectures.unet import PlainConvUNet

torch.set_num_threads(2)


def net(feats, strides):
    n = len(feats)
    return PlainConvUNet(1, n, feats, torch.nn.Conv3d, [[3, 3, 3]] * n, strides, [2] * n, 4, [2] * (n - 1), True,
                         torch.nn.InstanceNorm3d, {"eps": 1e-5, "affine": True}, None, None, torch.nn.LeakyReLU,
                         {"inplace": True}, deep_supervision=True)


cfgs = {
    "fullres 48x64x64 b2": ([32, 64, 128, 256, 320], [[1, 1, 1], [2, 2, 2], [2, 2, 2], [2, 2, 2], [1, 2, 2]], (48, 64, 64), 2),
    "32^3 b2 4st": ([32, 64, 128, 256], [[1, 1, 1], [2, 2, 2], [2, 2, 2], [2, 2, 2]], (32, 32, 32), 2),
    "32^3 b4 4st": ([32, 64, 128, 256], [[1, 1, 1], [2, 2, 2], [2, 2, 2], [2, 2, 2]], (32, 32, 32), 4),
    "32^3 b4 4st f16": ([16, 32, 64, 128], [[1, 1, 1], [2, 2, 2], [2, 2, 2], [2, 2, 2]], (32, 32, 32), 4),
    "24x40x40 b4 4st f16": ([16, 32, 64, 128], [[1, 1, 1], [2, 2, 2], [2, 2, 2], [1, 2, 2]], (24, 40, 40), 4),
    "48x64x64 b2 f16": ([16, 32, 64, 128, 256], [[1, 1, 1], [2, 2, 2], [2, 2, 2], [2, 2, 2], [1, 2, 2]], (48, 64, 64), 2),
}
for name, (f, s, ps, b) in cfgs.items():
    m = net(f, s)
    opt = torch.optim.SGD(m.parameters(), 0.01, momentum=0.99, nesterov=True)
    x = torch.randn(b, 1, *ps)
    ts, cs = [], []
    for i in range(4):
        t, c = time.time(), time.process_time()
        out = m(x)
        loss = sum(o.mean() for o in out)
        opt.zero_grad()
        loss.backward()
        opt.step()
        ts.append(time.time() - t)
        cs.append(time.process_time() - c)
    print(f"{name}: wall {min(ts[1:]):.3f}s cpu {min(cs[1:]):.3f}s per iter", flush=True)
