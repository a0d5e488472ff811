"""Scale-out on Ray (`python -m lampo.ppo_ray`): rollout workers and a learner group as actors.

  cluster.py   joining or starting the cluster (loopback, no dashboard), where each actor goes
  rollout.py   rollout workers (one engine each) and the driver's pool: parts, weights, restarts
  learners.py  the learner group: one torch.distributed group running the usual Learner
  driver.py    `RayTrainer`: the in-process Trainer's loop with those behind its phases

Imported only by `lampo.ppo_ray`; Ray is an optional dependency (`pip install lampo[ray]`).
"""
