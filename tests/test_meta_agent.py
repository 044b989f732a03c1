"""The ``meta`` agent rule: its closed-form hypergradient against autograd, and its update on small
problems whose right weights are known."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from mtkd.distill import StepInputs, kd_kl
from mtkd.distill.meta import (MetaAgent, TeacherScore, consensus_gradient, hypergradient, kd_logit_gradient,
                               meta_direction, teacher_features)
from mtkd.distill.state import AgentState

T = 4.0


def test_kd_logit_gradient_is_the_gradient_of_kd_kl():
    torch.manual_seed(0)
    student = torch.randn(5, 7, dtype=torch.float64, requires_grad=True)
    teachers = [torch.randn(5, 7, dtype=torch.float64) for _ in range(3)]
    delta = kd_logit_gradient(student.detach(), teachers, T)  # [B, M, C]
    for m, teacher in enumerate(teachers):
        (grad,) = torch.autograd.grad(kd_kl(student, teacher, T).sum(), student)
        torch.testing.assert_close(delta[:, m], grad)


def test_hypergradient_matches_autograd_through_a_classifier_step():
    """d L_meta(W', c') / d w[i, m] with (W', c') one SGD step of a linear classifier on
    CE + sum_m w KL (batch mean), autograd against the closed form -(lr / B) delta . v, where
    v is read from the meta batch's outputs AFTER the step (as the agent reads them)."""
    torch.manual_seed(1)
    B, N, M, C, D, lr = 6, 9, 3, 5, 4, 0.3
    W = torch.randn(C, D, dtype=torch.float64)
    c = torch.randn(C, dtype=torch.float64)
    embedding, meta_embedding = torch.rand(B, D, dtype=torch.float64), torch.rand(N, D, dtype=torch.float64)
    targets, meta_targets = torch.randint(C, (B,)), torch.randint(C, (N,))
    teachers = [torch.randn(B, C, dtype=torch.float64) * 2 for _ in range(M)]
    w = torch.full((B, M), 1.0 / M, dtype=torch.float64, requires_grad=True)

    params = (W.clone().requires_grad_(), c.clone().requires_grad_())
    logits = embedding @ params[0].T + params[1]
    kl = torch.stack([kd_kl(logits, t, T) for t in teachers], 1)
    loss = F.cross_entropy(logits, targets) + (w * kl).mean(0).sum()
    grads = torch.autograd.grad(loss, params, create_graph=True)
    W1, c1 = (p - lr * g for p, g in zip(params, grads))
    meta_teachers = [torch.randn(N, C, dtype=torch.float64) * 2 for _ in range(M)]
    meta_logits = meta_embedding @ W1.T + c1
    meta_loss = _consensus_loss(meta_logits, meta_targets, meta_teachers)
    (expected,) = torch.autograd.grad(meta_loss, w)

    delta = kd_logit_gradient(logits.detach(), teachers, T)
    g = consensus_gradient(meta_logits.detach(), meta_targets, meta_teachers, T)  # [N, C]
    closed = (lr / B) * hypergradient(delta, meta_direction(embedding, meta_embedding, g))
    torch.testing.assert_close(closed, expected)


def _consensus_loss(meta_logits, meta_targets, meta_teachers):
    """The meta loss, written independently: mean_j T^2 KL(q_j || softmax(z_j / T)), q_j the mean tempered
    distribution of the teachers whose argmax is the label (no term when there is none)."""
    total = meta_logits.new_zeros(())
    for j in range(meta_logits.shape[0]):
        right = [t[j] for t in meta_teachers if int(t[j].argmax()) == int(meta_targets[j])]
        if right:
            q = torch.stack([F.softmax(t / T, 0) for t in right]).mean(0)
            total = total + T * T * (q * (q.log() - F.log_softmax(meta_logits[j] / T, 0))).sum()
    return total / meta_logits.shape[0]


def test_consensus_gradient_is_the_gradient_of_the_meta_loss():
    torch.manual_seed(4)
    N, C, M = 7, 4, 3
    logits = torch.randn(N, C, dtype=torch.float64, requires_grad=True)
    targets = torch.randint(C, (N,))
    teachers = [torch.randn(N, C, dtype=torch.float64) * 3 for _ in range(M)]
    teachers[0][0] = -10.0  # sample 0: make every teacher wrong, so it has no term
    teachers[1][0] = -10.0
    teachers[2][0] = -10.0
    for t in teachers:
        t[0, (int(targets[0]) + 1) % C] = 5.0
    (expected,) = torch.autograd.grad(_consensus_loss(logits, targets, teachers) * N, logits)
    got = consensus_gradient(logits.detach(), targets, teachers, T)
    torch.testing.assert_close(got, expected)
    assert torch.equal(got[0], torch.zeros(C, dtype=torch.float64))


def _state(kl: torch.Tensor, cos: torch.Tensor) -> AgentState:
    return AgentState(vector=torch.zeros(kl.shape[0], 1), teacher_ce=torch.zeros_like(kl), logit_gap=kl, feature_gap=cos)


def test_policy_starts_at_equal_weights():
    agent = MetaAgent(3, 4)
    features = torch.randn(8, 3, 4)
    assert torch.equal(agent.policy(features, torch.randint(4, (8,))), torch.full((8, 3), 1 / 3))


def test_agent_learns_to_drop_a_wrong_teacher_on_a_linear_student():
    """Two teachers on a linearly separable problem: one gives the true class, the other a wrong one.
    The student (a linear classifier trained with CE + weighted KD) and the agent learn together; the
    agent must move the weight to the right teacher. Teacher CE is a feature here, so the agent can
    also generalise the rule; the class table alone would do too."""
    torch.manual_seed(2)
    C, D, B, M, lr = 4, 6, 32, 2, 0.5
    centres = torch.randn(C, D) * 3
    student = torch.nn.Linear(D, C)
    optimizer = torch.optim.SGD(student.parameters(), lr=lr)
    agent = MetaAgent(M, C, lr=0.5)
    wrong_weight = []
    for step in range(150):
        targets = torch.randint(C, (B,))
        embedding = (centres[targets] + torch.randn(B, D)).relu()
        right = F.one_hot(targets, C).float() * 8
        wrong = F.one_hot((targets + 1) % C, C).float() * 8
        logits = student(embedding)
        kl = torch.stack([kd_kl(logits, t, T) for t in (right, wrong)], 1)
        inputs = StepInputs([right, wrong], targets, _state(kl.detach(), torch.zeros(B, M)), student_logits=logits.detach(),
                            student_embedding=embedding, temperature=T)
        w_logit, _ = agent.step(inputs)
        wrong_weight.append(float(w_logit[:, 1].mean()))
        loss = F.cross_entropy(logits, targets) + (w_logit * kl).mean(0).sum()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert wrong_weight[0] == 0.5
    assert sum(wrong_weight[-20:]) / 20 < 0.1


def test_agent_state_round_trip_continues_exactly():
    torch.manual_seed(3)
    C, M, B = 4, 3, 8

    def inputs(seed):
        g = torch.Generator().manual_seed(seed)
        teachers = [torch.randn(B, C, generator=g) for _ in range(M)]
        targets = torch.randint(C, (B,), generator=g)
        kl = torch.rand(B, M, generator=g)
        return StepInputs(teachers, targets, _state(kl, torch.rand(B, M, generator=g)),
                          student_logits=torch.randn(B, C, generator=g), student_embedding=torch.rand(B, 5, generator=g),
                          temperature=T)

    a = MetaAgent(M, C, lr=1.0)
    for s in range(3):
        a.step(inputs(s))
    b = MetaAgent(M, C, lr=1.0)
    b.load_state_dict(a.state_dict())
    for s in range(3, 6):
        wa, _ = a.step(inputs(s))
        wb, _ = b.step(inputs(s))
        assert torch.equal(wa, wb)
    assert a.version == b.version == 5


def test_entropy_term_pulls_weights_towards_equal_without_a_signal():
    """With no hypergradient (every teacher's distillation did nothing), the loss is only
    ``entropy * KL(w || uniform)``: one step moves a skewed policy towards 1/M by exactly that
    loss's gradient, and without the term nothing moves."""
    M, C, B = 3, 4, 6
    features = torch.rand(B, M, 4)
    targets = torch.arange(B) % C

    def skewed(entropy):
        agent = MetaAgent(M, C, lr=0.5, entropy=entropy)
        with torch.no_grad():
            agent.policy.teacher_bias.copy_(torch.tensor([2.0, 0.0, -1.0]))
        agent.pending = {"features": features, "targets": targets, "delta": torch.zeros(B, M, C),
                         "embedding": torch.rand(B, 5)}
        return agent

    def spread(agent):
        with torch.no_grad():
            w = agent.policy(features, targets)
        return float((w - 1 / M).abs().sum())

    still, pulled = skewed(0.0), skewed(1.0)
    before = spread(still)
    expected = pulled.policy.teacher_bias.detach().clone()
    w = pulled.policy(features, targets)
    kl = (w * torch.log(w * M)).sum(1).mean()
    (grad,) = torch.autograd.grad(kl, pulled.policy.teacher_bias)
    for agent in (still, pulled):
        agent.update(torch.rand(8, 5), torch.zeros(8, C))
    assert spread(still) == before
    assert spread(pulled) < before
    torch.testing.assert_close(pulled.policy.teacher_bias.detach(), expected - 0.5 * grad)


def test_teacher_features_shape_and_values():
    teachers = [torch.tensor([[4.0, 0.0]]), torch.tensor([[0.0, 4.0]])]
    targets = torch.tensor([0])
    features = teacher_features(teachers, targets, torch.tensor([[16.0, 32.0]]), torch.tensor([[0.5, -0.5]]), T)
    assert features.shape == (1, 2, 4)
    right = torch.softmax(torch.tensor([4.0, 0.0]), 0)  # the first teacher's probabilities
    torch.testing.assert_close(features[0, :, 0], torch.stack([right[0], right[1]]))  # probability of the label
    torch.testing.assert_close(features[0, :, 1], torch.exp(-torch.tensor([1.0, 2.0])))  # exp(-KL / T^2)
    torch.testing.assert_close(features[0, :, 2], torch.stack([right[0], right[0]]))  # top probability
    torch.testing.assert_close(features[0, :, 3], torch.tensor([0.5, -0.5]))
    assert features[:, :, :3].min() >= 0 and features[:, :, :3].max() <= 1  # bounded: no saturating step
    assert isinstance(TeacherScore(2, 2), torch.nn.Module)


class _MirrorPool:
    """The session's teachers plus a mirror: a teacher slot whose outputs the transform replaces."""

    accepts_device_batches = True

    def __init__(self, inner):
        self.inner = inner

    def describe(self):
        described = self.inner.describe()
        return described + [{**described[0], "name": "mirror"}]

    def submit(self, batch):
        return self.inner.submit(batch)

    def collect(self, ticket):
        outputs = self.inner.collect(ticket)
        return outputs + [outputs[0]]

    def take_stats(self):
        return {}

    def close(self):
        pass


def _mirror(inputs):
    """The last teacher returns the student's own detached outputs: KL = MSE = 0."""
    from mtkd.models import Outputs

    projected = inputs.projected[-1]
    return [*inputs.teachers[:-1], Outputs(inputs.student.logits, projected.mean((2, 3)), projected)]


def test_meta_rule_moves_weight_off_a_mirror_teacher(teacher_dirs, tmp_path, one_torch_thread):
    """A teacher that returns the student's own outputs teaches nothing; within a short real run on
    Fashion-MNIST the meta rule must give it well under its equal share (1/3)."""
    from conftest import small_experiment
    from mtkd.engine import Distiller
    from mtkd.experiment import load_data, train_loader
    from mtkd.teachers import LocalTeacherPool, load_teacher

    config = small_experiment(tmp_path, teacher_dirs, ["data.train_subset=960", "distill.strategy=mtkd_rl",
                                                       "agent.rule=meta", "distill.warmup_epochs=0", "optim.epochs=2",
                                                       "agent.meta_lr=10"])
    torch.manual_seed(config.seed)
    train_set, _ = load_data(config.data, config.seed)
    pool = _MirrorPool(LocalTeacherPool([load_teacher(d) for d in teacher_dirs]))
    distiller = Distiller(config, pool, train_set.num_classes, train_set.image_shape, device="cpu",
                          teacher_transform=_mirror)
    loader = train_loader(train_set, config.data, config.seed)
    first = distiller.train_epoch(loader)
    last = distiller.train_epoch(loader)
    assert last["weights/logit/mirror"] < first["weights/logit/mirror"] < 1 / 3  # it starts at aver's 1/3
    assert last["weights/logit/mirror"] < 0.15, last
