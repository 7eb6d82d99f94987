"""GKE launcher: an indexed Job (one pod per host) plus a headless Service.

  python -m launch.gke --name=NAME --image=IMAGE --num-hosts=4 \
      --config=configs/base.py:PRESET --workdir=gs://BUCKET/RUN \
      [--accelerator=tpu --tpu-type=tpu-v5p-slice --tpu-topology=2x2x4 \
       | --accelerator=gpu --gpu-type=nvidia-h100-80gb] \
      [--chips-per-host=4] [--config.KEY=VALUE ...] [--dry-run]

With --dry-run the YAML is printed (pipe it to `kubectl apply -f -`);
otherwise it is applied. A plain indexed Job needs no JobSet controller:
pod i gets the hostname NAME-i, and the headless Service NAME makes
NAME-0.NAME resolve, which is the `jax.distributed` coordinator.
"""

import json
import re
import shlex
import sys

from launch import common

_COMPLETION_INDEX = (
    "metadata.annotations['batch.kubernetes.io/job-completion-index']")
_DNS_LABEL = re.compile(r'[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?')


def _q(value):
  """A YAML scalar: JSON strings are valid YAML and need no escaping rules."""
  return json.dumps(str(value))


def _node_selector(args):
  if args.accelerator == 'tpu':
    pairs = [('cloud.google.com/gke-tpu-accelerator', args.tpu_type),
             ('cloud.google.com/gke-tpu-topology', args.tpu_topology)]
  else:
    pairs = [('cloud.google.com/gke-accelerator', args.gpu_type)]
  lines = [f'        {k}: {_q(v)}' for k, v in pairs if v]
  return ['      nodeSelector:', *lines] if lines else []


def render(args):
  """Returns the Service + indexed Job YAML of parsed `args`."""
  resource = 'google.com/tpu' if args.accelerator == 'tpu' else 'nvidia.com/gpu'
  name, hosts = args.name, args.num_hosts
  command = common.main_command(args)
  if args.repo_dir:
    command = f'cd {shlex.quote(args.repo_dir)} && {command}'
  lines = [
      '---',
      'apiVersion: v1',
      'kind: Service',
      'metadata:',
      f'  name: {name}',
      'spec:',
      '  clusterIP: None',
      '  selector:',
      f'    job-name: {name}',
      '---',
      'apiVersion: batch/v1',
      'kind: Job',
      'metadata:',
      f'  name: {name}',
      'spec:',
      '  completionMode: Indexed',
      f'  completions: {hosts}',
      f'  parallelism: {hosts}',
      '  backoffLimit: 0',
      '  template:',
      '    spec:',
      f'      subdomain: {name}',
      '      restartPolicy: Never',
      *_node_selector(args),
      '      containers:',
      '      - name: main',
      f'        image: {_q(args.image)}',
      f'        command: ["bash", "-c", {_q(command)}]',
      '        ports:',
      f'        - containerPort: {args.port}',
      '        env:',
      '        - name: JAX_COORDINATOR_ADDRESS',
      f'          value: {_q(f"{name}-0.{name}:{args.port}")}',
      '        - name: JAX_NUM_PROCESSES',
      f'          value: {_q(hosts)}',
      '        - name: JAX_PROCESS_ID',
      '          valueFrom:',
      '            fieldRef:',
      f'              fieldPath: {_q(_COMPLETION_INDEX)}',
      '        resources:',
      '          limits:',
      f'            {resource}: {args.chips_per_host}',
  ]
  return '\n'.join(lines) + '\n'


def _parser():
  parser = common.make_parser(__doc__.splitlines()[0])
  parser.add_argument('--name', required=True, help='Job and Service name')
  parser.add_argument('--image', required=True, help='container image')
  parser.add_argument('--name-suffix', default='',
                      help='appended to --name (a sweep sets one per point)')
  parser.add_argument('--num-hosts', required=True,
                      type=common.positive_int)
  parser.add_argument('--accelerator', choices=('tpu', 'gpu'), default='tpu')
  parser.add_argument('--chips-per-host', type=common.positive_int,
                      default=4,
                      help='TPU chips or GPUs each pod requests')
  parser.add_argument('--tpu-type', default=None, help='e.g. tpu-v5p-slice')
  parser.add_argument('--tpu-topology', default=None, help='e.g. 2x2x4')
  parser.add_argument('--gpu-type', default=None, help='e.g. nvidia-h100-80gb')
  parser.add_argument('--port', type=int, default=1234,
                      help='jax.distributed coordinator port')
  parser.add_argument('--repo-dir', default='',
                      help='cd here first (default: the image WORKDIR)')
  common.add_main_flags(parser)
  common.add_dry_run_flag(parser)
  return parser


def main(argv=None):
  """Parses argv (default: sys.argv[1:]), prints or applies; returns code."""
  parser = _parser()
  args = common.parse_with_overrides(parser, argv)
  args.name += args.name_suffix
  if not _DNS_LABEL.fullmatch(args.name):
    parser.error(f'--name {args.name!r} is not a DNS label (a-z, 0-9, -)')
  return common.execute(['kubectl', 'apply', '-f', '-'], args.dry_run,
                        input_text=render(args))


if __name__ == '__main__':
  sys.exit(main())
