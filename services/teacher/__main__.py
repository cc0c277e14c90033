"""`python -m services.teacher` == `opd-teacher`."""

from services.teacher.main import main

main()
