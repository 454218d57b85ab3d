"""Every attack runs on the inputs' device (skipped without CUDA): generators, masks and results stay."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from test_attacks_fixtures import LATENT_DIM, tiny_generator, trained_classifier

from attacks import (
    PGD,
    FoolboxAttack,
    LatentAttack,
    LatentAttackConfig,
    Norm,
    OverpoweredAttack,
    OverpoweredConfig,
    PGDConfig,
    ThreatModel,
    TorchattacksAttack,
    per_sample_norm,
)

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def test_attacks_run_on_cuda() -> None:
    cpu_model, x_cpu, y_cpu = trained_classifier()
    model = copy.deepcopy(cpu_model).cuda()
    generator = copy.deepcopy(tiny_generator()).cuda()
    x, y = x_cpu.cuda(), y_cpu.cuda()
    for threat in (ThreatModel(Norm.LINF, 0.2), ThreatModel(Norm.L2, 1.2)):
        result = PGD(threat, PGDConfig(steps=10, restarts=2))(model, x, y)
        assert result.x_adv.device == x.device and result.success.device == x.device
        assert float(per_sample_norm(result.x_adv - x, threat.norm).max()) <= threat.eps * (1 + 1e-5)
        cpu_result = PGD(threat, PGDConfig(steps=10, restarts=2))(cpu_model, x_cpu, y_cpu)
        # different random streams on the two devices: robust accuracies agree, points need not
        assert abs(float(result.success.float().mean()) - float(cpu_result.success.float().mean())) < 0.06
    with pytest.raises(ValueError, match="expected y on device cuda:0"):
        PGD(ThreatModel(Norm.LINF, 0.1))(model, x, y_cpu)

    z = torch.randn(16, LATENT_DIM, device="cuda")
    with torch.no_grad():
        labels = model(generator(z)).argmax(1)
    latent = LatentAttack(LatentAttackConfig(eps=1.0, constraint="pixel", steps=10))(
        model, generator, z, labels
    )
    assert latent.x_adv.device == z.device
    assert torch.equal(generator(latent.z_adv), latent.x_adv)
    pairs = OverpoweredAttack(OverpoweredConfig(eps=0.1, steps=20))(model, generator, z)
    assert pairs.robust.device == z.device


def test_adapters_run_on_cuda() -> None:
    pytest.importorskip("torchattacks")
    pytest.importorskip("foolbox")
    cpu_model, x_cpu, y_cpu = trained_classifier()
    model = copy.deepcopy(cpu_model).cuda()
    x, y = x_cpu[:30].cuda(), y_cpu[:30].cuda()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for attack in (
            TorchattacksAttack("PGD", ThreatModel(Norm.LINF, 0.3), alpha=0.03, steps=10),
            TorchattacksAttack("AutoAttack", ThreatModel(Norm.LINF, 0.3)),
            FoolboxAttack("LinfPGD", ThreatModel(Norm.LINF, 0.3), abs_stepsize=0.03, steps=10),
        ):
            result = attack(model, x, y)
            assert result.x_adv.device == x.device and float(result.success.float().mean()) > 0.5
