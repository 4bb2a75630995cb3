"""Run a claim study (fair tuning, seeded runs with controls, ablation, report): see flatsophia.experiments.studies.

    python scripts/claim.py overfit --jobs 2
    python scripts/claim.py charlm --device gpu --jobs 16
    python scripts/claim.py overfit --phase report --docs docs/results/overfit
"""

import sys

from flatsophia.experiments.studies import main

if __name__ == "__main__":
    sys.exit(main())
