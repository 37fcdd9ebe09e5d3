#!/usr/bin/env bash
# Pascal VOC 07+12 detection: RetinaNet on Swin-L with Mona (12 epochs, 2 images per step).
#
# Defaults: 1 node x 2 GPUs = 2 ranks x 1 image: the official 2 images per step (log/voc/mona.txt: 2 GPUs), one task (= one rank) per GPU.
# The recipe fixes the images per step (train.global_batch): on other world sizes each rank's share and
# the gradient accumulation follow; a world size that cannot split it is refused. Override, e.g.
#   sbatch slurm/voc_mona.sh
#   SET="optim.lr=2e-4" RUN_DIR=runs/try1 sbatch --nodes=2 slurm/voc_mona.sh
#   CONFIG=configs/cpu/voc.yaml sbatch --nodes=2 --ntasks-per-node=1 --gpus-per-task=0 slurm/voc_mona.sh   # CPU-only nodes
# Submit from the checkout (or set MONA_DIST_ROOT). Knobs and the pre-emption/requeue protocol: slurm/common.sh.
#SBATCH --job-name=voc_mona
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=2
#SBATCH --gpus-per-task=1
#SBATCH --cpus-per-task=8
#SBATCH --time=24:00:00
#SBATCH --signal=USR1@120
#SBATCH --requeue
#SBATCH --open-mode=append
#SBATCH --output=%x-%j.out

source "${MONA_DIST_ROOT:-${SLURM_SUBMIT_DIR:-$(dirname "$0")/..}}/slurm/common.sh"
mona_train configs/voc_mona_swin_l.yaml
