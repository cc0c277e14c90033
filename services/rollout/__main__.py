"""`python -m services.rollout` == `opd-rollout`."""

from services.rollout.main import main

main()
