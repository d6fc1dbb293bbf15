import P2PKernel
