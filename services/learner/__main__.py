"""`python -m services.learner` == `opd-learner`."""

from services.learner.main import main

main()
