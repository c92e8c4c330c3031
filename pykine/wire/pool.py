"""The descriptor pool that holds pykine's wire declarations.

Not protobuf's default pool: other etcd libraries (aetcd, etcd3) declare the
same etcdserverpb and mvccpb names there, and a program using one of them
must still be able to import pykine.client. `make proto` points the
generated modules here.
"""

from google.protobuf import descriptor_pool

POOL = descriptor_pool.DescriptorPool()
