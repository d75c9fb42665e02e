"""The three zmserve roles: broker, worker, agent. Each is one small loop in its own package."""
