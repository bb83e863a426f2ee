//! Memory maps of a byte range of a file (a disk, a partition's range of a
//! disk image, a UKI on the ESP), for the delta decoder: the source of a
//! patch is mapped read-only and referenced by zstd as its prefix, the result
//! is decoded straight into a shared writable map of the inactive partition.
//! Both are file-backed pages (page cache), never anonymous memory, so a
//! whole root never counts against the agent's anonymous memory.
//!
//! The one module of the agent with `unsafe` code: `mmap`/`munmap`/`msync`
//! through rustix, `sync_file_range` through libc, a slice over the mapped
//! pages. The slice stays valid as long as the [`FileMapping`] lives (it
//! unmaps on drop); the file's bytes under it may change (another writer),
//! which changes what the slice reads but never its validity, except when
//! the file shrinks under the map (a read past its new end raises SIGBUS):
//! callers map ranges of disks (whose size does not change) and of files
//! they do not truncate.
#![allow(unsafe_code)]

use std::ffi::c_void;
use std::fs::File;
use std::io::{self, Seek, SeekFrom};
use std::ptr::NonNull;

use rustix::mm::{self, MapFlags, MsyncFlags, ProtFlags};

/// A mapped byte range of a file.
pub(crate) struct FileMapping {
    /// Start of the mapping (page-aligned), or dangling for an empty range.
    base: NonNull<c_void>,
    /// Bytes mapped from `base` (`skip` + the range's length).
    mapped_len: usize,
    /// Bytes between `base` and the range's first byte (the file offset's
    /// distance from the page boundary below it).
    skip: usize,
    len: usize,
    writable: bool,
}

// SAFETY: the mapping is plain memory owned by this value; nothing in it is
// tied to the thread that made it.
unsafe impl Send for FileMapping {}
// SAFETY: shared access only reads (`&[u8]`); writes need `&mut`.
unsafe impl Sync for FileMapping {}

/// The size of a memory page: maps start at page boundaries.
pub(crate) fn page_size() -> u64 {
    rustix::param::page_size() as u64
}

impl FileMapping {
    /// Maps `len` bytes of `file` from `offset`, read-only (private: the
    /// pages are the file's, never written).
    pub(crate) fn read_only(file: &File, offset: u64, len: u64) -> io::Result<FileMapping> {
        FileMapping::map(file, offset, len, false)
    }

    /// Maps `len` bytes of `file` from `offset`, shared and writable: what is
    /// written to the slice goes to the file ([`FileMapping::flush`] writes
    /// it out). `file` must be open for reading and writing.
    pub(crate) fn shared_writable(file: &File, offset: u64, len: u64) -> io::Result<FileMapping> {
        FileMapping::map(file, offset, len, true)
    }

    fn map(file: &File, offset: u64, len: u64, writable: bool) -> io::Result<FileMapping> {
        let len = usize::try_from(len)
            .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "range too long to map"))?;
        if len == 0 {
            return Ok(FileMapping {
                base: NonNull::dangling(),
                mapped_len: 0,
                skip: 0,
                len: 0,
                writable,
            });
        }
        // Touching a page past the end of the file (or device) is a SIGBUS,
        // not an error: the range must lie inside it.
        let size = {
            let mut handle = file;
            handle.seek(SeekFrom::End(0))?
        };
        if offset.checked_add(len as u64).is_none_or(|end| end > size) {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("{len} bytes at offset {offset} end past the file's {size} bytes"),
            ));
        }
        let aligned = offset - offset % page_size();
        let skip = (offset - aligned) as usize;
        let mapped_len = skip
            .checked_add(len)
            .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "range too long to map"))?;
        let (prot, flags) = if writable {
            (ProtFlags::READ | ProtFlags::WRITE, MapFlags::SHARED)
        } else {
            (ProtFlags::READ, MapFlags::PRIVATE)
        };
        // SAFETY: a new mapping at an address the kernel chooses (null hint),
        // of a file descriptor that is open; it aliases no Rust memory.
        let base =
            unsafe { mm::mmap(std::ptr::null_mut(), mapped_len, prot, flags, file, aligned) }?;
        let base = NonNull::new(base).ok_or_else(|| io::Error::other("mmap returned null"))?;
        Ok(FileMapping {
            base,
            mapped_len,
            skip,
            len,
            writable,
        })
    }

    /// Writes the mapped range's dirty pages to the file and waits for it
    /// (`msync(MS_SYNC)`); the caller still syncs the file (`fdatasync`).
    pub(crate) fn flush(&self) -> io::Result<()> {
        if self.mapped_len == 0 || !self.writable {
            return Ok(());
        }
        // SAFETY: exactly the range this value mapped.
        unsafe { mm::msync(self.base.as_ptr(), self.mapped_len, MsyncFlags::SYNC) }?;
        Ok(())
    }

    /// Tells the kernel the range is read (or written) front to back.
    pub(crate) fn advise_sequential(&self) {
        if self.mapped_len == 0 {
            return;
        }
        // SAFETY: exactly the range this value mapped; advice changes no contents.
        let _ = unsafe { mm::madvise(self.base.as_ptr(), self.mapped_len, mm::Advice::Sequential) };
    }
}

/// Starts writing `len` bytes of `file`'s dirty pages from `offset` to the
/// disk and returns without waiting (`sync_file_range(SYNC_FILE_RANGE_WRITE)`):
/// what a decoder has finished goes out while it decodes the rest, instead
/// of all at the final flush. Durability still comes from that flush.
pub(crate) fn start_writeback(file: &File, offset: u64, len: u64) -> io::Result<()> {
    use std::os::fd::AsRawFd;
    let (Ok(offset), Ok(len)) = (i64::try_from(offset), i64::try_from(len)) else {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "range too long to write back",
        ));
    };
    // SAFETY: a plain system call on an open descriptor; it touches no memory.
    let result = unsafe {
        libc::sync_file_range(file.as_raw_fd(), offset, len, libc::SYNC_FILE_RANGE_WRITE)
    };
    if result != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

impl std::ops::Deref for FileMapping {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        if self.len == 0 {
            return &[];
        }
        // SAFETY: `base + skip .. + len` lies inside the live mapping, which
        // is readable; it is unmapped only on drop.
        unsafe {
            std::slice::from_raw_parts(
                self.base.as_ptr().cast::<u8>().add(self.skip).cast_const(),
                self.len,
            )
        }
    }
}

impl std::ops::DerefMut for FileMapping {
    fn deref_mut(&mut self) -> &mut [u8] {
        assert!(self.writable, "a read-only mapping was written");
        if self.len == 0 {
            return &mut [];
        }
        // SAFETY: as in `deref`; the mapping is writable and `&mut self`
        // makes this the only slice over it.
        unsafe {
            std::slice::from_raw_parts_mut(self.base.as_ptr().cast::<u8>().add(self.skip), self.len)
        }
    }
}

impl Drop for FileMapping {
    fn drop(&mut self) {
        if self.mapped_len == 0 {
            return;
        }
        // SAFETY: the range this value mapped; no slice over it outlives `self`.
        let _ = unsafe { mm::munmap(self.base.as_ptr(), self.mapped_len) };
    }
}

#[cfg(test)]
mod tests {
    use std::io::{Read, Write};

    use super::*;

    #[test]
    fn a_range_past_the_end_of_the_file_is_an_error_not_a_sigbus() {
        let mut file = tempfile::tempfile().unwrap();
        file.write_all(&[1u8; 10_000]).unwrap();
        FileMapping::read_only(&file, 0, 10_000).unwrap();
        let error = FileMapping::read_only(&file, 5000, 5001).err().unwrap();
        assert!(
            error
                .to_string()
                .contains("5001 bytes at offset 5000 end past the file's 10000 bytes"),
            "{error}"
        );
        assert!(FileMapping::shared_writable(&file, u64::MAX, 2).is_err());
    }

    #[test]
    fn maps_an_unaligned_range_and_writes_through() {
        let mut file = tempfile::tempfile().unwrap();
        let data: Vec<u8> = (0..20_000u32).map(|index| (index % 251) as u8).collect();
        file.write_all(&data).unwrap();
        let source = FileMapping::read_only(&file, 5000, 9000).unwrap();
        assert_eq!(&source[..], &data[5000..14_000]);
        drop(source);

        let mut target = FileMapping::shared_writable(&file, 4097, 3).unwrap();
        target.copy_from_slice(b"abc");
        target.flush().unwrap();
        drop(target);
        let mut back = vec![0u8; 5];
        file.seek(SeekFrom::Start(4096)).unwrap();
        file.read_exact(&mut back).unwrap();
        assert_eq!(back, [data[4096], b'a', b'b', b'c', data[4100]]);

        let empty = FileMapping::read_only(&file, 123, 0).unwrap();
        assert!(empty.is_empty());
    }
}
