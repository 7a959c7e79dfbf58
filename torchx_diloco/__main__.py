import sys

from torchx_diloco.train import main

sys.exit(main())
